"""Quantized inter-group traffic: the quantizer's error bounds, and the engine with ``quant`` on
gloo meshes (bytes against the formulas, replicas agreeing bit for bit, intra-group exactness,
training close to the exact run)."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh

from dist_utils import run_distributed
from models import Net, batch, loss_fn
from paro_fsdp import InterQuant, ParoOptimizer, ParoStrategy, comm_stats, memory_stats, paro_parallelize
from paro_fsdp.comm.groups import MeshGroups
from paro_fsdp.comm.quant import FORMATS, dequantize, feedback_slot, packed_bytes, quantize
from paro_fsdp.comm.stats import INTER, phase
from paro_fsdp.feedback_state import feedback_state_dict, feedback_template, load_feedback_state_dict
from paro_fsdp.formulas import Topology, comm_bytes, feedback_elements, memory_bytes

CODES = [str(s) for s in ParoStrategy.all_valid()]
LEVELS = {"int8": 127, "int4": 7}
INT8 = InterQuant(params="int8", grads="int8", block_size=64)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 4), numel=st.integers(1, 300), block=st.sampled_from([2, 8, 64, 256]),
       fmt=st.sampled_from(FORMATS), scale=st.floats(1e-6, 1e6), seed=st.integers(0, 2**31 - 1))
def test_quantizer_error_is_at_most_half_a_step(rows, numel, block, fmt, scale, seed):
    x = torch.randn(rows, numel, generator=torch.Generator().manual_seed(seed)) * scale
    packed = quantize(x, fmt, block)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, packed_bytes(numel, fmt, block))
    y = dequantize(packed, numel, fmt, block)
    pad = -(-numel // block) * block - numel
    blocks = torch.nn.functional.pad(x, (0, pad)).view(rows, -1, block)
    step = (blocks.abs().amax(dim=2, keepdim=True) / LEVELS[fmt]).expand_as(blocks).reshape(rows, -1)[:, :numel]
    err = (y - x).abs()
    assert bool((err <= step * (0.5 + 1e-5) + 1e-30).all()), f"max error / step {(err / step).max().item()}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantizer_keeps_zeros_exact_and_non_finite_values_non_finite(fmt):
    x = torch.tensor([[0.0, 0.0, 1.0, float("inf"), 2.0, float("nan"), 3.0, -1.0]])
    y = dequantize(quantize(x, fmt, 2), 8, fmt, 2)[0]
    assert y[:2].tolist() == [0.0, 0.0]
    assert not torch.isfinite(y[2:6]).any(), "a block holding inf or nan must not come back finite"
    assert torch.isfinite(y[6:]).all() and torch.allclose(y[6:], x[0, 6:], atol=3 / LEVELS[fmt] / 2)
    assert torch.equal(dequantize(quantize(torch.zeros(2, 5), fmt, 4), 5, fmt, 4), torch.zeros(2, 5))


@pytest.mark.parametrize("kwargs, match", [
    ({"params": "int4"}, "params='int4' is invalid; valid values: int8"),
    ({"grads": "fp8"}, "grads='fp8' is invalid; valid values: int8, int4"),
    ({"block_size": 3}, "block_size=3 is invalid"),
    ({"block_size": 0}, "block_size=0 is invalid"),
])
def test_bad_settings_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InterQuant(**kwargs)


def test_error_feedback_needs_quantized_gradients():
    with pytest.raises(ValueError, match="error_feedback=True corrects quantized gradients, but grads=None"):
        InterQuant(params="int8", error_feedback=True)
    assert InterQuant(params="int8", grads="int4", error_feedback=True).label == "p8g4e"


def _repeated_reduce_scatter(feedback: bool) -> float:
    """The same gradient reduce-scattered across 2 groups 32 times with int4: how far the mean of
    what arrived is from the exact sum (what an optimizer integrates over steps)."""
    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp_replicate", "dp_shard"))
    groups = MeshGroups(mesh, quant=InterQuant(grads="int4", block_size=64, error_feedback=feedback))
    x = torch.randn(2, 1000, generator=torch.Generator().manual_seed(dist.get_rank()))
    exact = x.clone()
    dist.all_reduce(exact)
    total = torch.zeros(1000)
    for _ in range(32):
        out = torch.empty(1000)
        with phase("sync_g"), feedback_slot("unit"):
            groups.start_reduce_scatter(out, x.view(-1), INTER).wait()
        total += out
    residual_bytes = sum(r.numel() * r.element_size() for r in groups.residuals.values())
    assert residual_bytes == (2 * 1000 * 4 if feedback else 0)
    return float((total / 32 - exact[dist.get_rank()]).abs().max() / exact.abs().max())


def test_error_feedback_keeps_quantization_error_from_building_up():
    without, with_feedback = (max(run_distributed(_repeated_reduce_scatter, 2, fb)) for fb in (False, True))
    assert without > 0.01  # int4's error does not average out on a repeated gradient
    assert with_feedback < without / 8, (with_feedback, without)


def _second_hops(g: int, m: int) -> dict:
    mesh = init_device_mesh("cpu", (g, m), mesh_dim_names=("dp_replicate", "dp_shard"))
    groups = MeshGroups(mesh, quant=InterQuant(grads="int8", block_size=64))
    rank = dist.get_rank()
    xs = [torch.randn(1001 + 7 * i, generator=torch.Generator().manual_seed(10 * rank + i)) for i in range(3)]
    out: dict = {}
    with phase("sync_g"):
        # Issued, never waited for: the second hop must leave without the caller.
        hop = (g - 1) * packed_bytes(-(-xs[0].numel() // g), "int8", 64)  # each hop sends one chunk per peer
        pending = groups.start_all_reduce(xs[0].clone(), INTER)
        deadline = time.monotonic() + 60
        while groups.stats.get("sync_g", INTER) < 2 * hop and time.monotonic() < deadline:
            time.sleep(0.01)
        out["sent before wait"] = (hop, groups.stats.get("sync_g", INTER))
        pending.wait()
        one_at_a_time = [x.clone() for x in xs]
        for x in one_at_a_time:
            groups.start_all_reduce(x, INTER).wait()
        in_flight = [x.clone() for x in xs]
        handles = [groups.start_all_reduce(x, INTER) for x in in_flight]
        for handle in reversed(handles):  # waited in another order than issued
            handle.wait()
        averaged = xs[1].clone()
        groups.start_all_reduce(averaged, INTER, op=dist.ReduceOp.AVG).wait()
    out["same bits in flight"] = all(a.equal(b) for a, b in zip(one_at_a_time, in_flight))
    out["results"] = [x.numpy() for x in one_at_a_time]
    out["averaged"] = averaged.numpy()
    exact = [x.clone() for x in xs]
    for x in exact:
        dist.all_reduce(x, group=groups.inter)
    out["exact"] = [x.numpy() for x in exact]

    def failing(group: dist.ProcessGroup) -> None:
        raise ValueError("the first hop failed")

    landed = groups._relay.submit(failing)
    with pytest.raises(ValueError, match="the first hop failed"):
        landed()
    return out


def test_quantized_all_reduce_sends_its_second_hop_without_waiting_for_the_caller():
    """The all-gather of the sums leaves as soon as the all-to-all lands, not at ``wait()``
    (on gloo from a worker thread, on a group of its own); the results are the same whether the
    handles are waited one at a time or several in flight in another order, every replica holds
    the same bits, the sum is within the quantization error of the exact one, AVG divides it,
    and an error in the hop surfaces at ``wait()``."""
    runs = run_distributed(_second_hops, 4, 2, 2)
    for rank, out in enumerate(runs):
        hop, sent = out["sent before wait"]
        assert sent == 2 * hop, f"rank {rank}: second hop not sent before wait ({sent} of {2 * hop} bytes)"
        assert out["same bits in flight"], f"rank {rank}"
        peer = runs[rank ^ 2]  # the other group's rank with the same local index
        for got, other, exact in zip(out["results"], peer["results"], out["exact"]):
            assert got.tobytes() == other.tobytes(), f"rank {rank}: replicas differ"
            assert abs(got - exact).max() <= 0.02 * abs(exact).max()
        assert abs(out["averaged"] - out["results"][1] / 2).max() <= 0.02 * abs(out["exact"][1]).max()


def test_parallelize_rejects_a_quant_that_is_not_an_interquant():
    with pytest.raises(TypeError, match="quant must be a paro_fsdp.InterQuant"):
        paro_parallelize(Net(), None, "IIG", quant={"params": "int8"})


STEPS, ACCUM, DIM = 3, 2, 64


def _net(dim: int) -> Net:
    return Net(dim=dim, in_features=dim, out_features=dim)  # rows divide by n: no padding in the bytes


def _step(model, opt, s: int, dim: int) -> None:
    """One optimizer step on step ``s``'s ACCUM micro-batches (each rank its own)."""
    for a in range(ACCUM):
        model.set_requires_gradient_sync(a == ACCUM - 1)
        (loss_fn(model, batch(s, a, dist.get_rank(), dim, dim)) / ACCUM).backward()
    opt.step()
    opt.zero_grad()
    model.wait_parameters()  # the step's sync_p lands in its own byte counts


def _train(mesh, code: str, quant: InterQuant | None, dim: int = 16, **kwargs) -> tuple[dict, dict]:
    """Train ``Net`` with SGD for a few steps; its full state dict and the last step's bytes."""
    torch.manual_seed(0)
    model = _net(dim)
    model = paro_parallelize(model, mesh, code, blocks=model.units(), quant=quant, **kwargs)
    opt = ParoOptimizer(model, torch.optim.SGD, lr=0.1)
    for s in range(STEPS):
        comm_stats(model).reset()
        _step(model, opt, s, dim)
    stats = comm_stats(model).as_dict()  # the step's; the state dict below gathers masters (exactly)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    # numpy arrays travel back by value (tensors would go through shared memory the worker frees)
    return {k: v.numpy().copy() for k, v in full.items()}, stats


def _all_strategies(g: int, m: int) -> dict:
    mesh = init_device_mesh("cpu", (g, m), mesh_dim_names=("dp_replicate", "dp_shard"))
    out = {}
    for code in CODES:
        exact, _ = _train(mesh, code, None, DIM)
        quantized, stats = _train(mesh, code, INT8, DIM)
        out[code] = {"exact": exact, "quant": quantized, "bytes": stats,
                     "psi": sum(p.numel() for p in _net(DIM).parameters())}
    return out


@pytest.fixture(scope="module")
def two_by_two():
    return run_distributed(_all_strategies, 4, 2, 2)


@pytest.mark.parametrize("code", CODES)
def test_quantized_inter_bytes_match_the_formulas(two_by_two, code):
    topo = Topology(2, 2)
    for rank, per_rank in enumerate(two_by_two):
        run = per_rank[code]
        expected = comm_bytes(code, topo, run["psi"], accum=ACCUM, quant=INT8)
        exact = comm_bytes(code, topo, run["psi"], accum=ACCUM)
        for ph, links in run["bytes"].items():
            if ph == "other":
                assert links == {"intra": 0, "inter": 0}
                continue
            # intra-group traffic is untouched; per-chunk rounding to whole blocks adds < 3% across
            assert links["intra"] == pytest.approx(exact[ph]["intra"], abs=0.5), f"rank {rank} {ph}/intra"
            assert links["inter"] == pytest.approx(expected[ph]["inter"], rel=0.03, abs=0.5), (
                f"rank {rank} {code} {ph}/inter: measured {links['inter']}, formula {expected[ph]['inter']}")
            if exact[ph]["inter"]:
                assert links["inter"] <= 0.27 * exact[ph]["inter"], f"rank {rank} {code} {ph}: not a quarter"


@pytest.mark.parametrize("code", CODES)
def test_every_replica_holds_the_same_bits(two_by_two, code):
    first = two_by_two[0][code]["quant"]
    for rank, per_rank in enumerate(two_by_two[1:], start=1):
        for name, value in per_rank[code]["quant"].items():
            assert value.tobytes() == first[name].tobytes(), f"rank {rank} {code}: {name} differs from rank 0's"


@pytest.mark.parametrize("code", CODES)
def test_quantized_training_stays_close_to_the_exact_run(two_by_two, code):
    run = two_by_two[0][code]
    moves_inter = any(links["inter"] for links in run["bytes"].values())
    diff = max(float(abs(run["quant"][k] - run["exact"][k]).max()) for k in run["exact"])
    size = max(float(abs(run["exact"][k]).max()) for k in run["exact"])
    assert diff < 2e-2 * size, f"{code}: quantized run drifted {diff} (largest parameter {size})"
    if moves_inter:
        assert diff > 0, f"{code}: nothing was quantized"


def _small_updates(g: int, m: int) -> dict:
    """Initial parameters, then those after steps far smaller than a quantization step, exact and quantized."""
    mesh = init_device_mesh("cpu", (g, m), mesh_dim_names=("dp_replicate", "dp_shard"))
    out = {}
    for code in ("IIG", "NIG", "GGG", "III"):
        runs = {}
        for name, quant in (("exact", None), ("quant", InterQuant(params="int8", grads="int8"))):
            torch.manual_seed(0)
            model = _net(16)
            initial = {k: v.detach().clone().numpy() for k, v in model.state_dict().items()}
            model = paro_parallelize(model, mesh, code, blocks=model.units(), quant=quant)
            opt = ParoOptimizer(model, torch.optim.SGD, lr=1e-4)
            for s in range(STEPS):
                loss_fn(model, batch(s, 0, dist.get_rank(), 16, 16)).backward()
                opt.step()
                opt.zero_grad()
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
            runs[name] = {k: v.numpy().copy() for k, v in full.items()}
            runs[f"{name}_memory"] = memory_stats(model)["optim"]
        out[code] = {"initial": initial, **runs}
    return out


def test_masters_keep_updates_smaller_than_a_quantization_step():
    """Where sync_p crosses groups quantized, the fp32 master lives at O apart from P's dequantized
    copy: steps of about 1e-5 (far below int8's step for these weights) accumulate in it as in the exact
    run, and the state dict (what checkpoints hold) carries the master."""
    results = run_distributed(_small_updates, 4, 2, 2)[0]
    for code, run in results.items():
        moved = {k: run["exact"][k] - run["initial"][k] for k in run["initial"]}
        assert max(float(abs(v).max()) for v in moved.values()) > 0
        for k, delta in moved.items():
            got = run["quant"][k] - run["initial"][k]
            assert float(abs(got - delta).max()) <= 0.05 * float(abs(delta).max()), \
                f"{code} {k}: the quantized run's master moved {got} where the exact one moved {delta}"
        # IIG and NIG (P coarser than O, sync_p across groups) keep an fp32 master at O: K grows
        # from SGD's 0 to 4 bytes per element at O; GGG (P = O) and III (sync_p inside the group) do not.
        assert (run["quant_memory"] > run["exact_memory"]) == (code in ("IIG", "NIG")), code


HO_RING_CODES = ("GGG", "NIG", "NNN", "IIG")


def _ho_ring(g: int, m: int) -> dict:
    mesh = init_device_mesh("cpu", (g, m), mesh_dim_names=("dp_replicate", "dp_shard"))
    return {code: _train(mesh, code, INT8, DIM, comm="ho_ring", ho_ring_chunks=4) for code in HO_RING_CODES}


def test_ho_ring_carries_the_same_quantized_traffic():
    """HO-Ring's chunks quantize their inter phase as the two-phase collectives do: the same
    bytes up to per-chunk rounding, and replicas that agree bit for bit."""
    runs = run_distributed(_ho_ring, 4, 2, 2)
    psi = sum(p.numel() for p in _net(DIM).parameters())
    for code in HO_RING_CODES:
        expected = comm_bytes(code, Topology(2, 2), psi, accum=ACCUM, quant=INT8)
        for rank, per_rank in enumerate(runs):
            params, stats = per_rank[code]
            for ph in expected:
                assert stats[ph]["inter"] == pytest.approx(expected[ph]["inter"], rel=0.03, abs=0.5), \
                    f"rank {rank} {code} {ph}/inter"
            assert all(params[k].tobytes() == runs[0][code][0][k].tobytes() for k in params), \
                f"rank {rank} {code}: replicas differ"


def _one_group(m: int) -> bool:
    mesh = init_device_mesh("cpu", (1, m), mesh_dim_names=("dp_replicate", "dp_shard"))
    for code in ("GGG", "NIG", "NNN"):
        exact, _ = _train(mesh, code, None)
        quantized, stats = _train(mesh, code, InterQuant(params="int8", grads="int4"))
        assert all(quantized[k].tobytes() == exact[k].tobytes() for k in exact), f"{code}: intra traffic changed"
        assert not any(links["inter"] for links in stats.values())
    return True


def _residual_memory(g: int, m: int) -> dict:
    mesh = init_device_mesh("cpu", (g, m), mesh_dim_names=("dp_replicate", "dp_shard"))
    quant = InterQuant(params="int8", grads="int4", error_feedback=True)
    out = {}
    for code in CODES:
        torch.manual_seed(0)
        model = _net(DIM)
        model = paro_parallelize(model, mesh, code, blocks=model.units(), quant=quant)
        opt = ParoOptimizer(model, torch.optim.SGD, lr=0.1)
        for a in range(ACCUM):
            model.set_requires_gradient_sync(a == ACCUM - 1)
            (loss_fn(model, batch(0, a, dist.get_rank(), DIM, DIM)) / ACCUM).backward()
        opt.step()
        opt.zero_grad()
        out[code] = memory_stats(model)["grads"]  # between steps: the residuals, and rows kept (below)
    return out


def test_error_feedback_residuals_match_the_memory_formula():
    """Between steps a rank holds its residuals and, where P = G = N, the gradient row the next
    window reuses: the formula's gradient state, which it keeps through every window anyway."""
    psi = sum(p.numel() for p in _net(DIM).parameters())
    quant = InterQuant(params="int8", grads="int4", error_feedback=True)
    for rank, held in enumerate(run_distributed(_residual_memory, 4, 2, 2)):
        for code, nbytes in held.items():
            kept = memory_bytes(code, Topology(2, 2), psi)["grads"] if code.startswith("NN") else 0
            expected = 4 * feedback_elements(code, Topology(2, 2), psi, quant) + kept
            assert expected > 0 and nbytes == pytest.approx(expected, rel=0.01), f"rank {rank} {code}"


def test_intra_group_traffic_stays_exact():
    assert run_distributed(_one_group, 2, 2) == [True, True]


def test_int4_gradients_are_an_eighth_of_fp32_plus_scales():
    quant = InterQuant(grads="int4", block_size=128)
    fp32 = comm_bytes("IIG", Topology(2, 4), 1e6)
    q4 = comm_bytes("IIG", Topology(2, 4), 1e6, quant=quant)
    assert q4["sync_g"]["inter"] / fp32["sync_g"]["inter"] == pytest.approx((0.5 + 4 / 128) / 4)
    assert q4["sync_p"]["inter"] == fp32["sync_p"]["inter"]
    assert math.isclose(q4["param_gather"]["intra"], fp32["param_gather"]["intra"])


def _feedback_resume(path: str) -> dict:
    """Save IIG with int4 + error feedback on 2x2 after 2 steps; resume in fresh models."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate", "dp_shard"))
    quant = InterQuant(params="int8", grads="int4", block_size=64, error_feedback=True)
    full = StateDictOptions(full_state_dict=True)

    def build(code: str):
        torch.manual_seed(0)
        model = _net(DIM)
        model = paro_parallelize(model, mesh, code, blocks=model.units(), quant=quant)
        return model, ParoOptimizer(model, torch.optim.AdamW, lr=1e-2)

    def steps(model, opt, start: int, count: int) -> None:
        for s in range(start, start + count):
            _step(model, opt, s, DIM)

    def resumed(code: str, with_feedback: bool) -> tuple[int, float]:
        model, opt = build(code)
        saved = {k.removeprefix("feedback."): m.size
                 for k, m in dcp.FileSystemReader(path).read_metadata().state_dict_metadata.items()
                 if k.startswith("feedback.")}
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
                 "feedback": feedback_template(model, saved) if with_feedback else {}}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        loaded = load_feedback_state_dict(model, state["feedback"])
        steps(model, opt, 2, 2)
        got = get_model_state_dict(model, options=full)
        return loaded, max((got[k].float() - want[k].float()).abs().max().item() for k in want)

    src, src_opt = build("IIG")
    steps(src, src_opt, 0, 2)
    residuals = feedback_state_dict(src)
    dcp.save({"model": get_model_state_dict(src), "optim": get_optimizer_state_dict(src, src_opt),
              "feedback": residuals}, checkpoint_id=path)
    kept = len(residuals)
    steps(src, src_opt, 2, 2)
    want = get_model_state_dict(src, options=full)
    return {"kept": kept, "IIG": resumed("IIG", True), "IIG without": resumed("IIG", False),
            "NIG": resumed("NIG", True)}


def test_error_feedback_residuals_resume_exactly_from_a_checkpoint(tmp_path):
    for rank, got in enumerate(run_distributed(_feedback_resume, 4, str(tmp_path / "ckpt"))):
        assert got["kept"] > 0
        assert got["IIG"] == (got["kept"], 0.0), f"rank {rank}: the same layout resumes bit for bit"
        loaded, diff = got["IIG without"]
        assert loaded == 0 and diff > 0, f"rank {rank}: dropping the residuals must show ({diff})"
        assert got["NIG"][0] == 0, f"rank {rank}: another strategy's run starts its residuals at zero"


def _bf16_inter_bytes() -> dict:
    """IIG and NIG on 2x2 with bf16 compute, exact and int8 (params) + int8 / int4 (grads): the
    last step's inter-group bytes by phase."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate", "dp_shard"))
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    out = {}
    for code in ("IIG", "NIG"):
        for name, quant in (("exact", None), ("int8", InterQuant(params="int8", grads="int8")),
                            ("int4", InterQuant(params="int8", grads="int4"))):
            _, stats = _train(mesh, code, quant, DIM, mp_policy=bf16)
            out[code, name] = {ph: links["inter"] for ph, links in stats.items()}
    return out


def test_with_bf16_compute_quantized_traffic_is_about_half_of_the_exact_bytes():
    """bf16 compute moves a bf16 copy in sync_p and fp32 gradients in sync_g: int8 halves the
    parameters' bytes (<= 0.53x), quarters the gradients' (<= 0.27x), int4 gradients <= 0.14x."""
    for rank, got in enumerate(run_distributed(_bf16_inter_bytes, 4)):
        for code in ("IIG", "NIG"):
            exact, int8, int4 = (got[code, name] for name in ("exact", "int8", "int4"))
            assert exact["sync_p"] > 0 and exact["sync_g"] > 0, (rank, code, exact)
            assert int8["sync_p"] <= 0.53 * exact["sync_p"], (rank, code, int8, exact)
            assert int8["sync_g"] <= 0.27 * exact["sync_g"], (rank, code, int8, exact)
            assert int4["sync_g"] <= 0.14 * exact["sync_g"], (rank, code, int4, exact)
            assert sum(int8.values()) <= 0.53 * sum(exact.values()), (rank, code)
