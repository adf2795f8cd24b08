"""The paper's mixed-precision layout: a bf16 copy at P and the fp32 master at O, for all 14
strategies in one 2x2 gloo process group; checkpoints across layouts and from stock FSDP2, and
under the module wrappers torchtitan applies (activation checkpointing, torch.compile)."""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate

from dist_utils import run_distributed
from models import Net, batch, loss_fn
from paro_fsdp import ParoOptimizer, ParoStrategy, comm_stats, memory_stats, paro_parallelize
from paro_fsdp.formulas import Topology
from paro_oracle import TRAINING_PHASES, comm_bytes

CODES = [str(s) for s in ParoStrategy.all_valid()]
MASTERS_APART = [str(s) for s in ParoStrategy.all_valid() if s.param < s.optim]  # P coarser than O
BF16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
FULL = StateDictOptions(full_state_dict=True)
STEPS, ACCUM, DIM = 3, 2, 16  # rows divide by n = 4: no padding in the byte and memory counts


def _mesh(g: int, m: int):
    return init_device_mesh("cpu", (g, m), mesh_dim_names=("dp_replicate", "dp_shard"))


def _model(mesh, code: str, policy: MixedPrecisionPolicy = BF16, wrap: bool = False):
    """The test model under ``code``; ``wrap`` puts torchtitan's wrappers around its units first:
    activation checkpointing alone, activation checkpointing then compile (torchtitan's order),
    compile alone."""
    torch.manual_seed(0)
    model = Net(dim=DIM, depth=2, in_features=DIM, out_features=DIM)
    if wrap:
        model.layers[0] = checkpoint_wrapper(model.layers[0], preserve_rng_state=False)
        model.layers[1] = torch.compile(checkpoint_wrapper(model.layers[1], preserve_rng_state=False), backend="eager")
        model.head = torch.compile(model.head, backend="eager")
    return paro_parallelize(model, mesh, code, blocks=model.units(), mp_policy=policy)


def _copy_is_cast_master(model) -> bool:
    """Every rank's copy at P equals its master (the model state dict's value) cast, bit for bit."""
    masters = get_model_state_dict(model)
    return all(torch.equal(masters[_fqn(name)].to_local().to(p.dtype), p.to_local()) for name, p in model.named_parameters())


def _fqn(name: str) -> str:
    """A parameter's name without the wrappers' segments, as checkpoints key it."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def _train(model, opt, steps: int, start: int = 0) -> list[float]:
    rank, losses = dist.get_rank(), []
    for s in range(start, start + steps):
        total = 0.0
        for a in range(ACCUM):
            model.set_requires_gradient_sync(a == ACCUM - 1)
            loss = loss_fn(model, batch(s, a, rank, in_features=DIM, out_features=DIM)) / ACCUM
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses


def _all_strategies() -> dict:
    mesh, out = _mesh(2, 2), {}
    for code in CODES:
        model = _model(mesh, code)
        opt = ParoOptimizer(model, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
        losses, exact, fresh = [], [], []
        probe = torch.randn(4, DIM, generator=torch.Generator().manual_seed(7))
        for s in range(STEPS):
            losses += _train(model, opt, 1, start=s)
            with torch.no_grad():
                first = model(probe)  # right after the step: must not read parameters the step's sync_p still writes
                model.wait_parameters()
                fresh.append(torch.equal(first, model(probe)))
            exact.append(_copy_is_cast_master(model))  # the state dict waits for the step's sync_p
        _train(model, opt, 1, start=STEPS)  # FSDP2 state after the no-grad probes settles in a training step
        model.wait_parameters()
        comm_stats(model).reset()  # one more step, alone in the byte counters
        _train(model, opt, 1, start=STEPS + 1)
        model.wait_parameters()
        psi = sum(p.numel() for p in model.parameters())
        out[code] = {"losses": losses, "exact": exact, "fresh": fresh, "memory": memory_stats(model), "psi": psi,
                     "bytes": comm_stats(model).as_dict(),
                     "param_dtype": str(next(model.parameters()).dtype),
                     "state_dict_dtype": str(next(iter(get_model_state_dict(model).values())).dtype)}
    return out


def _checkpoints(path: str) -> dict:
    """IIG (bf16 at P) -> GGG (fp32 at P) -> IIG, and a stock FSDP2 checkpoint into IIG: masters exact."""
    out = {}
    src = _model(_mesh(2, 2), "IIG")
    src_opt = ParoOptimizer(src, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    _train(src, src_opt, 2)
    dcp.save({"model": get_model_state_dict(src), "optim": get_optimizer_state_dict(src, src_opt)},
             checkpoint_id=f"{path}/iig")
    want = get_model_state_dict(src, options=FULL)
    want_next = _train(src, src_opt, 1, start=2)

    def load(model, opt, where: str) -> None:
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=where)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])

    ggg = _model(_mesh(1, 4), "GGG")
    ggg_opt = ParoOptimizer(ggg, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    load(ggg, ggg_opt, f"{path}/iig")
    got = get_model_state_dict(ggg, options=FULL)
    out["iig_to_ggg"] = max((got[k] - v).abs().max().item() for k, v in want.items())
    out["ggg_dtype"] = str(next(ggg.parameters()).dtype)
    dcp.save({"model": get_model_state_dict(ggg), "optim": get_optimizer_state_dict(ggg, ggg_opt)},
             checkpoint_id=f"{path}/ggg")
    back = _model(_mesh(2, 2), "IIG")
    back_opt = ParoOptimizer(back, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    load(back, back_opt, f"{path}/ggg")
    got = get_model_state_dict(back, options=FULL)
    out["ggg_to_iig"] = max((got[k] - v).abs().max().item() for k, v in want.items())
    out["copy_is_cast_master"] = _copy_is_cast_master(back)
    out["resume"] = max(abs(a - b) for a, b in zip(_train(back, back_opt, 1, start=2), want_next))

    torch.manual_seed(0)
    stock = Net(dim=DIM, depth=2, in_features=DIM, out_features=DIM)
    flat = init_device_mesh("cpu", (4,))
    for block in stock.units():
        fully_shard(block, mesh=flat, mp_policy=BF16)
    fully_shard(stock, mesh=flat, mp_policy=BF16)
    with torch.no_grad():
        for p in stock.parameters():
            p.add_(0.125)  # values a fresh model does not have
    dcp.save({"model": get_model_state_dict(stock)}, checkpoint_id=f"{path}/stock")
    want = get_model_state_dict(stock, options=FULL)
    paro = _model(_mesh(2, 2), "IIG")
    ParoOptimizer(paro, torch.optim.AdamW, lr=1e-2)
    state = {"model": get_model_state_dict(paro)}
    dcp.load(state, checkpoint_id=f"{path}/stock")
    set_model_state_dict(paro, state["model"])
    got = get_model_state_dict(paro, options=FULL)
    out["stock_to_iig"] = max((got[k] - v).abs().max().item() for k, v in want.items())
    return out


def _wrapped_masters() -> dict:
    """For each strategy with its master apart: the same training with and without wrappers, then
    a load of values no run has; the state dicts' keys, and how far their values differ."""
    mesh, out = _mesh(2, 2), {}
    clean_keys = set(Net(dim=DIM, depth=2, in_features=DIM, out_features=DIM).state_dict())
    for code in MASTERS_APART:
        plain, wrapped = _model(mesh, code), _model(mesh, code, wrap=True)
        for model in (plain, wrapped):
            _train(model, ParoOptimizer(model, torch.optim.AdamW, lr=1e-2, weight_decay=0.1), 2)
        want, got = get_model_state_dict(plain, options=FULL), get_model_state_dict(wrapped, options=FULL)
        # A module inside a unit asked on its own (no unit pre-hook runs) gathers the master itself.
        inner = wrapped.layers[0]._checkpoint_wrapped_module.lin.state_dict()["weight"].full_tensor()
        target = {k: v + 0.125 for k, v in get_model_state_dict(wrapped).items()}
        set_model_state_dict(wrapped, target)
        loaded = get_model_state_dict(wrapped, options=FULL)
        # Values placed otherwise than the parameters (torchtitan 0.3's fused QKV load hook hands
        # the merged weight over replicated): each rank's master must take its own shard.
        replicated = {k: (v + 0.25).redistribute(v.device_mesh, [Replicate()] * v.device_mesh.ndim)
                      for k, v in get_model_state_dict(plain).items()}
        plain.load_state_dict(replicated)
        from_replicated = get_model_state_dict(plain, options=FULL)
        out[code] = {
            "replicated": max((from_replicated[k] - (want[k] + 0.25)).abs().max().item() for k in want),
            "replicated_copy_is_cast_master": _copy_is_cast_master(plain),
            "keys": sorted(got), "clean_keys": sorted(clean_keys),
            "dtypes": sorted({str(v.dtype) for v in got.values()}),
            "trained": max((got[k] - want[k]).abs().max().item() for k in want),
            "loaded": max((loaded[k] - (want[k] + 0.125)).abs().max().item() for k in want),
            "inner": (inner - want["layers.0.lin.weight"]).abs().max().item(),
            "copy_is_cast_master": _copy_is_cast_master(wrapped),
        }
    return out


@pytest.fixture(scope="module")
def runs():
    return run_distributed(_all_strategies, 4)


@pytest.mark.parametrize("code", CODES)
def test_losses_equal_ggg_and_copies_equal_masters(runs, code):
    for rank, per_rank in enumerate(runs):
        got, want = per_rank[code]["losses"], per_rank["GGG"]["losses"]
        assert all(abs(a - b) <= 1e-3 * abs(b) for a, b in zip(got, want)), (rank, code, got, want)
        assert all(per_rank[code]["exact"]) and all(per_rank[code]["fresh"]), (rank, code)
        assert per_rank[code]["state_dict_dtype"] == "torch.float32"


@pytest.mark.parametrize("code", CODES)
def test_memory_and_bytes_follow_the_layout(runs, code):
    s = ParoStrategy.parse(code)
    narrow = s.param < s.optim  # the copy at P is bf16 and the master moves to O (K = 8 + 4)
    param_b, k, sync_p_b = (2, 12, 2) if narrow else (4, 8, 4)
    f = {lvl: lvl.fraction(2, 4) for lvl in (s.param, s.grad, s.optim)}
    topo = Topology(2, 2)
    for rank, per_rank in enumerate(runs):
        run = per_rank[code]
        psi = run["psi"]
        assert run["param_dtype"] == ("torch.bfloat16" if narrow else "torch.float32")
        assert run["memory"]["params"] == param_b * psi * f[s.param]
        assert run["memory"]["optim"] == k * psi * f[s.optim]
        # bf16 gathers, fp32 reductions and sync_g, sync_p in the dtype of the copy at P.
        want = comm_bytes(code, topo, psi, accum=ACCUM, param_bytes=2, grad_bytes=4, master_bytes=4,
                          sync_p_bytes=sync_p_b)
        for ph in TRAINING_PHASES:
            for link in ("intra", "inter"):
                assert run["bytes"][ph][link] == pytest.approx(want[ph][link], abs=0.5), (rank, code, ph, link)


def test_checkpoints_keep_the_masters():
    with tempfile.TemporaryDirectory() as path:
        results = run_distributed(_checkpoints, 4, path)
    for r in results:
        assert r["ggg_dtype"] == "torch.float32"
        assert r["iig_to_ggg"] == 0.0 and r["ggg_to_iig"] == 0.0 and r["stock_to_iig"] == 0.0, r
        assert r["copy_is_cast_master"] and r["resume"] == 0.0, r


def test_masters_keep_the_parameters_fqns_under_activation_checkpointing_and_compile():
    assert len(MASTERS_APART) == 8
    for per_rank in run_distributed(_wrapped_masters, 4):
        for code, r in per_rank.items():
            assert r["keys"] == r["clean_keys"], (code, r["keys"])
            assert r["dtypes"] == ["torch.float32"], code
            assert r["trained"] == 0.0 and r["inner"] == 0.0, (code, r)  # the wrappers change no value
            assert r["loaded"] == 0.0 and r["copy_is_cast_master"], (code, r)  # a load reaches the masters
            assert r["replicated"] == 0.0 and r["replicated_copy_is_cast_master"], (code, r)
