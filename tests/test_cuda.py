"""paro-fsdp on a CUDA GPU: NCCL on one rank, and several ranks in one process on one GPU.

Without a CUDA GPU every CUDA case is skipped ("needs a CUDA GPU"); the CPU variants of the
same checks run everywhere, which keeps the harnesses themselves tested. ``bash
scripts/gpu_check.sh`` runs this file on a GPU machine (and then fails if CUDA is missing).

- One rank, launched with torchrun, on an NCCL-only default group (as torchtitan creates it:
  no CPU backend beside it): ``paro_parallelize`` + ``ParoOptimizer`` + ``clip_grad_norm_``
  against a single-process reference on the same device, a DCP save under one strategy and
  load under another, and the library's own collectives outside the engine (the probe's
  barrier and timing reduction, object collectives). The CPU variant runs it on gloo.
- ``paro probe``: on one GPU there is no link to measure, so the CLI refuses a single rank;
  the measurement itself runs on 2 x 2 threaded ranks with CUDA tensors.
- torchtitan's debug run on one GPU with ``paro_strategy`` set, in fp32 and with the shipped
  GPU configs' bf16 + activation checkpointing + compile (and ``auto``, which needs two
  data-parallel ranks and must say so); the ``auto`` choice and its broadcast on 2 x 2
  threaded ranks.
- Threaded ranks (torch's threaded process group: one thread per rank, one process, one
  GPU): HO-Ring equals the flat collective; the engine's gradients and SGD step equal a CPU
  reference bit for bit, in fp32, bf16 and bf16 under activation checkpointing (the fp32
  masters at O read back under the parameters' own names). The model's weights and data are small integers, so every product
  and sum is exact in fp32 whatever the order and device.
- Stream safety: the same engine check with every collective delayed on the stream it was
  issued on (``torch.cuda._sleep``), as a slow link delays NCCL. The engine's consumers of
  FSDP2's reduce-scatter output then run long after FSDP2 has freed that buffer and reused it
  for the next block's reduce-scatter (identical blocks: same size, same cached block); a
  consumer not protected by ``record_stream`` reads the next block's gradients.

On CUDA, the threaded process group's collectives are ordered on device streams as NCCL's
are (:class:`_StreamOrderedCollective`): each rank's issuing stream records an event, the
data moves on rank 0's issuing stream after all of them, and every rank's stream waits for
that. The host does not wait, so device work lags the host as it does on NCCL.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.testing._internal.distributed.multi_threaded_pg as mtpg

from conftest import INSTALLED, needs_any_torchtitan, needs_torchtitan
from paro_fsdp.comm.torch_compat import all_gather_single, reduce_scatter_single

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "train_configs" / "llama3_debug_paro.toml"
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=needs_cuda)]
SUM, AVG = dist.ReduceOp.SUM, dist.ReduceOp.AVG


def test_cuda_is_present_when_the_gpu_check_requires_it() -> None:
    """``scripts/gpu_check.sh`` sets PARO_REQUIRE_CUDA=1: a machine without CUDA then fails, not skips."""
    if os.environ.get("PARO_REQUIRE_CUDA") == "1":
        assert HAS_CUDA, f"PARO_REQUIRE_CUDA=1 but torch {torch.__version__} sees no CUDA GPU"


def _mesh(device: str, g: int, m: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device, (g, m), mesh_dim_names=("dp_replicate", "dp_shard"))


# ----------------------------------------------------------------------------- threaded ranks


class _OnStreams:
    """Runs a threaded collective's data movement on rank 0's issuing stream, after every rank's."""

    def __init__(self, inner: Any, world: int) -> None:
        self.inner = inner
        self.ready: list[torch.cuda.Event | None] = [None] * world
        self.done: torch.cuda.Event | None = None

    def work(self, data: Any) -> None:
        stream = torch.cuda.current_stream()
        for event in self.ready:
            if event is not None:
                stream.wait_event(event)
        self.inner.work(data)
        self.done = stream.record_event()


class _StreamOrderedCollective(mtpg.Collective):
    """A threaded-PG collective on CUDA tensors, ordered on the ranks' streams like an NCCL kernel.

    ``delay_cycles`` > 0 first spins the issuing stream (``torch.cuda._sleep``): the collective
    completes that much later on the device while the host goes on, as over a slow link.
    """

    delay_cycles = 0

    def __init__(self, world_size: int, collective: Any, pg: Any) -> None:
        super().__init__(world_size, _OnStreams(collective, world_size), pg)

    def join(self, rank: int, data: Any) -> Any:
        if not any(isinstance(t, torch.Tensor) and t.is_cuda for t in mtpg.flatten_list(data)):
            return super().join(rank, data)
        stream = torch.cuda.current_stream()
        if self.delay_cycles:
            torch.cuda._sleep(self.delay_cycles)
        self._collective.ready[rank] = stream.record_event()
        work = super().join(rank, data)
        stream.wait_event(self._collective.done)
        return work


def run_threaded(fn: Callable[..., Any], world: int, *args: Any, device: str = "cpu", delay_cycles: int = 0,
                 timeout: float = 600) -> list[Any]:
    """``fn(*args)`` on ``world`` ranks of torch's threaded process group (one thread each); per-rank results.

    On CUDA every collective is stream-ordered (:class:`_StreamOrderedCollective`), delayed by
    ``delay_cycles`` on its stream.
    """
    results: list[Any] = [None] * world
    errors: list[tuple[int, BaseException, str]] = []
    mtpg._install_threaded_pg()
    store = dist.HashStore()
    original = mtpg.Collective
    if device == "cuda":
        mtpg.Collective = _StreamOrderedCollective
        _StreamOrderedCollective.delay_cycles = delay_cycles
    torch._C._distributed_c10d._set_thread_isolation_mode(True)

    def worker(rank: int) -> None:
        try:
            if device == "cuda":
                torch.cuda.set_device(0)
            dist.init_process_group("threaded", rank=rank, world_size=world, store=store)
            results[rank] = fn(*args)
            if device == "cuda":
                torch.cuda.synchronize()
        except BaseException as error:  # noqa: BLE001 - reported below; wakes the other ranks
            errors.append((rank, error, traceback.format_exc()))
            mtpg.ProcessLocalGroup.exception_handle(error)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()

    threads = [threading.Thread(target=worker, args=(r,), daemon=True, name=f"rank{r}") for r in range(world)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout)
        hung = [t.name for t in threads if t.is_alive()]
    finally:
        mtpg.ProcessLocalGroup.reset()
        mtpg.Collective = original
        _StreamOrderedCollective.delay_cycles = 0
        mtpg._uninstall_threaded_pg()
        torch._C._distributed_c10d._set_thread_isolation_mode(False)
    if hung:
        pytest.fail(f"threaded ranks did not finish in {timeout} s: {hung}")
    if errors:  # the first real error; the others' SystemExit only says they were woken
        rank, _, text = next((e for e in errors if not isinstance(e[1], SystemExit)), errors[0])
        pytest.fail(f"threaded rank {rank} failed:\n{text}")
    return results


# HO-Ring --------------------------------------------------------------------------------


def _ints(numel: int, dtype: torch.dtype, seed: int, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 9, (numel,), generator=gen).to(device=device, dtype=dtype)


def _flat_all_gather(x: torch.Tensor) -> torch.Tensor:
    out = x.new_empty(dist.get_world_size() * x.numel())
    all_gather_single(out, x)
    return out


def _flat_reduce_scatter(x: torch.Tensor, op: Any) -> torch.Tensor:
    n = dist.get_world_size()
    out = x.new_empty(x.numel() // n, dtype=torch.float32)
    reduce_scatter_single(out, x.float())
    return (out / n if op == AVG else out).to(x.dtype)


def _flat_all_reduce(x: torch.Tensor, op: Any) -> torch.Tensor:
    out = x.float()
    dist.all_reduce(out)
    return (out / dist.get_world_size() if op == AVG else out).to(x.dtype)


def _ho_ring_matches_flat(device: str, g: int, m: int) -> int:
    """Every HO-Ring collective (sync, and async waited out of order) = the flat one over all ranks."""
    from paro_fsdp.comm import HORingCollectives, MeshGroups

    mesh = _mesh(device, g, m)
    groups = MeshGroups(mesh)
    assert groups.device.type == device
    n, rank, checked = g * m, dist.get_rank(), 0
    for chunks in (1, 3):
        ho = HORingCollectives(groups, chunks=chunks, min_chunk_bytes=0)
        for dtype in (torch.float32, torch.bfloat16):
            for s in (1, 13, 100):
                case = f"{device} {g}x{m} chunks={chunks} {dtype} size={s}"
                x = _ints(s, dtype, rank * 1000 + s, device)
                out = x.new_empty(n * s)
                ho.all_gather(out, x)
                assert torch.equal(out, _flat_all_gather(x)), f"all_gather {case}"
                full = _ints(n * s, dtype, rank * 1000 + s + 1, device)
                for op in (SUM, AVG):
                    out = x.new_empty(s)
                    ho.reduce_scatter(out, full, op)
                    assert torch.equal(out, _flat_reduce_scatter(full, op)), f"reduce_scatter {op} {case}"
                    t = full[: s * m + 1].clone()  # any size: padded to a multiple of n inside
                    ho.all_reduce(t, op)
                    assert torch.equal(t, _flat_all_reduce(full[: s * m + 1], op)), f"all_reduce {op} {case}"
                    checked += 2
                checked += 1
    ho = HORingCollectives(groups, chunks=3, min_chunk_bytes=0)
    a, b, c = (_ints(k, torch.float32, rank * 7 + k, device) for k in (11, 5 * n, 29))
    out_a, out_b, t_c = a.new_empty(n * 11), b.new_empty(5), c.clone()
    works = [ho.all_gather(out_a, a, async_op=True), ho.reduce_scatter(out_b, b, AVG, async_op=True),
             ho.all_reduce(t_c, SUM, async_op=True)]
    for i in (2, 0, 1):
        works[i].wait()
    assert torch.equal(out_a, _flat_all_gather(a)), f"async all_gather {device}"
    assert torch.equal(out_b, _flat_reduce_scatter(b, AVG)), f"async reduce_scatter {device}"
    assert torch.equal(t_c, _flat_all_reduce(c, SUM)), f"async all_reduce {device}"
    return checked + 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("g", "m"), [(2, 2), (4, 2)], ids=["2x2", "4x2"])
def test_threaded_ho_ring_equals_flat_collectives(device: str, g: int, m: int) -> None:
    # On CUDA every collective is delayed on its stream: results must not depend on the host
    # finishing first.
    counts = run_threaded(_ho_ring_matches_flat, g * m, device, g, m, device=device,
                          delay_cycles=200_000 if device == "cuda" else 0)
    assert counts == [counts[0]] * (g * m) and counts[0] == 2 * 2 * 3 * 5 + 3


# The engine, exactly -------------------------------------------------------------------------

DIM, DEPTH, BATCH, ACCUM = 16, 6, 4, 2
LR = 2.0**-10  # a power of two: the SGD step stays exact
ENGINE_CASES = (("NNN", "ho_ring"), ("NNG", "ho_ring"), ("NIG", "default"), ("NII", "ho_ring"),
                ("IIG", "ho_ring"), ("IGG", "default"), ("GIG", "ho_ring"), ("GGG", "ho_ring"))


class Chain(nn.Module):
    """``DEPTH`` identical linear blocks, each its own PaRO unit (same sizes: the allocator reuses blocks)."""

    def __init__(self, dim: int = DIM, depth: int = DEPTH) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def integer_chain() -> Chain:
    """Weights with two entries of +-1 per row and per column (a sum of two signed permutations),
    biases in {-1, 0, 1}: activations and gradients at most double per block, and all stay
    small integers, exact in fp32 (TF32 included) whatever the summation order. With the
    batches below, activations stay within 38 and a micro-batch's gradients within 136, so
    bf16 compute (fp32 reduction) is exact too."""
    gen = torch.Generator().manual_seed(0)
    model = Chain()
    rows = torch.arange(DIM)
    with torch.no_grad():
        for layer in model.layers:
            weight = torch.zeros(DIM, DIM)
            for _ in range(2):
                signs = torch.randint(0, 2, (DIM,), generator=gen).float() * 2 - 1
                weight[rows, torch.randperm(DIM, generator=gen)] += signs
            layer.weight.copy_(weight)
            layer.bias.copy_(torch.randint(-1, 2, (DIM,), generator=gen).float())
    return model


def chain_batch(rank: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * rank + micro)
    return (torch.randint(-2, 3, (BATCH, DIM), generator=gen).float(),
            torch.randint(-2, 3, (BATCH, DIM), generator=gen).float())


def chain_loss(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], device: str) -> torch.Tensor:
    x, target = (t.to(device) for t in data)
    return (model(x) * target).sum()  # linear in the output: integer gradients


def chain_reference(n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One process on CPU: the mean over n ranks of the gradients summed over their micro-batches,
    its global norm, and the parameters after one SGD step."""
    model = integer_chain()
    loss = sum(chain_loss(model, chain_batch(r, a), "cpu") for r in range(n) for a in range(ACCUM)) / n
    loss.backward()
    norm = torch.stack([p.grad.double().square().sum() for p in model.parameters()]).sum().sqrt().float()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(p.grad, alpha=-LR)
    return norm, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()


def _engine_run(device: str, g: int, m: int, cases: tuple[tuple[str, str], ...],
                bf16: bool = False, ac: bool = False) -> dict[str, Any]:
    """Per strategy: the clipped-by-nothing global norm and every full parameter after one SGD step.

    ``bf16``: compute in bf16 and reduce in fp32 (where P is coarser than O, the parameters at
    P are then bf16 copies and the fp32 masters live at O). ``ac``: every block under
    activation checkpointing's wrapper, as torchtitan applies it; the state dict must still use
    the reference's (clean) names.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from paro_fsdp import ParoOptimizer, clip_grad_norm_, paro_parallelize

    mesh, rank = _mesh(device, g, m), dist.get_rank()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    out = {}
    for code, comm in cases:
        model = integer_chain().to(device)
        if ac:
            for i, layer in enumerate(model.layers):
                model.layers[i] = checkpoint_wrapper(layer, preserve_rng_state=False)
        model = paro_parallelize(model, mesh, code, blocks=list(model.layers), comm=comm, mp_policy=policy)
        computed = []  # the blocks' output dtypes: the policy is in force, else bf16 tests nothing
        for layer in model.layers:
            layer.register_forward_hook(lambda _m, _i, y: computed.append(y.dtype))
        opt = ParoOptimizer(model, torch.optim.SGD, lr=LR)
        for a in range(ACCUM):
            model.set_requires_gradient_sync(a == ACCUM - 1)
            chain_loss(model, chain_batch(rank, a), device).backward()
        assert set(computed) == {torch.bfloat16 if bf16 else torch.float32}, (code, set(computed))
        norm = clip_grad_norm_(model, float("inf"))  # coefficient 1: returns the norm, gradients unchanged
        opt.step()
        opt.state_dict()  # the optimizer's state keys cross ranks as an object collective
        params = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # after sync_p
        out[f"{code}/{comm}"] = (norm.detach().cpu(), {k: _full(p) for k, p in params.items()})
    return out


def _assert_exact(results: list[dict[str, Any]], n: int, what: str) -> None:
    ref_norm, ref_params = chain_reference(n)
    for rank, per_rank in enumerate(results):
        for case, (norm, params) in per_rank.items():
            assert torch.equal(norm, ref_norm), f"{what} rank {rank} {case}: norm {norm.item()!r} != {ref_norm.item()!r}"
            for name, ref in ref_params.items():
                diff = (params[name] - ref).abs().max().item()
                assert torch.equal(params[name], ref), f"{what} rank {rank} {case}: {name} differs by {diff}"


@pytest.mark.parametrize(("bf16", "ac"), [(False, False), (True, False), (True, True)],
                         ids=["fp32", "bf16", "bf16-activation-checkpointing"])
@pytest.mark.parametrize("device", DEVICES)
def test_threaded_engine_matches_the_reference_bit_for_bit(device: str, bf16: bool, ac: bool) -> None:
    results = run_threaded(_engine_run, 4, device, 2, 2, ENGINE_CASES, bf16, ac, device=device)
    _assert_exact(results, 4, f"{device} 2x2 {'bf16' if bf16 else 'fp32'}{' AC' if ac else ''}")


@needs_cuda
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_engine_gradients_survive_a_slow_consumer_stream(bf16: bool) -> None:
    # ~5-10 ms per collective on current GPUs: the streams that consume FSDP2's reduce-scatter
    # output fall far behind the reduce-scatter stream, which reuses the freed buffer for the
    # next (identical) block at once. Results must still be exact.
    results = run_threaded(_engine_run, 4, "cuda", 2, 2, ENGINE_CASES, bf16, device="cuda", delay_cycles=10_000_000)
    _assert_exact(results, 4, f"cuda 2x2 {'bf16' if bf16 else 'fp32'}, collectives delayed on their streams")


# Quantized inter-group traffic ---------------------------------------------------------------

QUANT_CASES = (("IIG", "default"), ("NIG", "ho_ring"), ("GGG", "ho_ring"), ("NNN", "default"), ("NNN", "ho_ring"))


def _quantized_run(device: str) -> dict[str, Any]:
    """Per strategy, every full parameter after two SGD steps with int8 parameters and gradients across groups."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from paro_fsdp import InterQuant, ParoOptimizer, paro_parallelize

    mesh, rank = _mesh(device, 2, 2), dist.get_rank()
    out = {}
    for code, comm in QUANT_CASES:
        model = integer_chain().to(device)
        model = paro_parallelize(model, mesh, code, blocks=list(model.layers), comm=comm,
                                 quant=InterQuant(params="int8", grads="int8", block_size=64))
        opt = ParoOptimizer(model, torch.optim.SGD, lr=0.01)
        for step in range(2):
            for a in range(ACCUM):
                model.set_requires_gradient_sync(a == ACCUM - 1)
                chain_loss(model, chain_batch(rank, a + step), device).backward()
            opt.step()
            opt.zero_grad()
        params = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        out[f"{code}/{comm}"] = {k: _full(p) for k, p in params.items()}
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_threaded_quantized_traffic_agrees_across_replicas_and_devices(device: str) -> None:
    # The quantize / dequantize kernels run on the stream that issues the collective; on CUDA the
    # collectives are delayed on their streams, so a buffer freed too early would be overwritten.
    results = run_threaded(_quantized_run, 4, device, device=device,
                           delay_cycles=10_000_000 if device == "cuda" else 0)
    on_cpu = results if device == "cpu" else run_threaded(_quantized_run, 4, "cpu")
    for case, params in results[0].items():
        for rank, per_rank in enumerate(results[1:] + on_cpu, start=1):
            for name, value in per_rank[case].items():
                assert torch.equal(value, params[name]), f"{device} {case}: {name} of run {rank} differs"


# Probe and auto on threaded ranks --------------------------------------------------------------


def _probe_points(device: str) -> dict[str, Any]:
    from paro_fsdp.comm.groups import MeshGroups
    from paro_fsdp.probe import measure

    return measure(MeshGroups(_mesh(device, 2, 2)), sizes=(4096, 65536), repeats=1, warmup=0)


@pytest.mark.parametrize("device", DEVICES)
def test_threaded_probe_measures_both_links(device: str) -> None:
    points = run_threaded(_probe_points, 4, device, device=device)
    assert all(p == points[0] for p in points), "every rank reduces the same (slowest-rank) times"
    for kind in ("all_gather", "reduce_scatter", "all_reduce"):
        for link in ("intra", "inter"):
            # Over 2 ranks every kind sends the per-rank size once (an all-reduce: 2 (2-1) / 2 of it).
            assert [b for b, _ in points[0][kind][link]] == [4096, 65536], (kind, link)
            assert all(t > 0 for _, t in points[0][kind][link]), (kind, link)


def _meta_debug_model() -> nn.Module:
    from torchtitan.protocols.train_spec import get_train_spec

    import torchtitan_patch  # noqa: F401  (registers the specs)

    spec = get_train_spec("llama3")
    with torch.device("meta"):
        return spec.model_cls(spec.model_args["debugmodel"])


def _auto_choice(device: str, model: nn.Module, job: Any) -> str:
    from torchtitan_patch.auto import choose_auto_strategy
    from torchtitan_patch.settings import ParoConfigError, paro_settings

    try:
        return choose_auto_strategy(model, paro_settings(job, 4), _mesh(device, 2, 2), job, 2).code
    except ParoConfigError as e:
        return f"error: {e}"


@pytest.mark.parametrize("device", DEVICES)
@needs_torchtitan
def test_threaded_auto_broadcasts_rank0s_choice_or_error(device: str, tmp_path: Path) -> None:
    from torchtitan.config import ConfigManager

    from paro_fsdp.planner import Calibration, LinkFit, write_calibration
    from torchtitan_patch.auto import device_memory_bytes, plan
    from torchtitan_patch.settings import paro_settings

    model = _meta_debug_model()
    for nodes, ranks in ((2, 2), (2, 4)):  # this layout, then a file measured on another one
        path = tmp_path / f"cal_{nodes}x{ranks}.json"
        write_calibration(Calibration(nodes=nodes, ranks_per_node=ranks, intra=LinkFit(1e-5, 1e10),
                                      inter=LinkFit(1e-4, 1e7)), path)
        job = ConfigManager().parse_args([
            "--job.config_file", str(CONFIG), "--job.dump_folder", str(tmp_path),
            "--parallelism.paro_strategy", "auto", "--parallelism.paro_calibration", str(path)])
        choices = run_threaded(_auto_choice, 4, device, model, job, device=device)
        assert choices == [choices[0]] * 4, choices
        if (nodes, ranks) == (2, 2):
            settings = paro_settings(job, 4)
            from paro_fsdp.planner import read_calibration

            expected, _ = plan(model, settings, job, 2, read_calibration(path), device_memory_bytes(settings, device))
            assert choices[0] == expected.code
        else:
            assert choices[0].startswith("error: ") and "measured on 2 group(s) x 4 rank(s)" in choices[0]


# ----------------------------------------------------------------------------- one rank, torchrun


def _to(data: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(device) for t in data)


def _net_reference(device: torch.device, steps: int, accum: int, max_norm: float):
    """One process, no process group: AdamW with torch's clipping on the same device."""
    from models import Net, batch, loss_fn

    torch.manual_seed(0)
    model = Net().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    norms = []
    for s in range(steps):
        for a in range(accum):
            (loss_fn(model, _to(batch(s, a, 0), device)) / accum).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item())
        opt.step()
        opt.zero_grad()
    return norms, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _paro_net(mesh, device: torch.device, code: str, comm: str):
    from models import Net

    from paro_fsdp import ParoOptimizer, paro_parallelize

    torch.manual_seed(0)
    model = Net().to(device)
    model = paro_parallelize(model, mesh, code, blocks=model.units(), comm=comm)
    return model, ParoOptimizer(model, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)


def _paro_train(model, opt, device: torch.device, steps: range, accum: int, max_norm: float) -> list[float]:
    from models import batch, loss_fn

    from paro_fsdp import clip_grad_norm_

    norms = []
    for s in steps:
        for a in range(accum):
            model.set_requires_gradient_sync(a == accum - 1)
            (loss_fn(model, _to(batch(s, a, 0), device)) / accum).backward()
        norms.append(clip_grad_norm_(model, max_norm).item())
        opt.step()
        opt.zero_grad()
    return norms


def _max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    return max(((_full(a[k]).float() - _full(b[k]).float()).abs().max().item() if torch.is_tensor(a[k])
                else (0.0 if a[k] == b[k] else math.inf)) for k in a)


def _copied(state: Any) -> Any:
    if isinstance(state, dict):
        return {k: _copied(v) for k, v in state.items()}
    return _full(state) if torch.is_tensor(state) else state


def _one_rank(device_type: str, out: Path, ckpt: Path) -> None:
    """Body of the torchrun worker (one rank): everything the library sends, on one device."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from paro_fsdp.comm.device import all_gather_object, barrier, broadcast_object, collective_device
    from paro_fsdp.probe import _timed

    if device_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl")  # NCCL alone, as torchtitan does: no CPU backend to fall back on
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    result: dict[str, Any] = {"backend": dist.get_backend(), "collective_device": str(collective_device())}
    barrier()
    result["objects"] = [broadcast_object({"from": dist.get_rank()}), all_gather_object(["x", 1])]
    result["timed"] = _timed(lambda: None, device)
    mesh = _mesh(device_type, 1, 1)

    full = StateDictOptions(full_state_dict=True)
    steps, accum, max_norm = 3, 2, 0.5
    ref_norms, ref_state = _net_reference(device, steps, accum, max_norm)
    result["engine"] = {}
    for code, comm in (("IIG", "ho_ring"), ("GGG", "default"), ("NNG", "ho_ring")):
        model, opt = _paro_net(mesh, device, code, comm)
        norms = _paro_train(model, opt, device, range(steps), accum, max_norm)
        state = get_model_state_dict(model, options=full)
        result["engine"][f"{code}/{comm}"] = {
            "norm_diff": max(abs(x - y) / y for x, y in zip(norms, ref_norms, strict=True)),
            "param_diff": _max_diff(state, ref_state),
            "device": str(next(iter(state.values())).device),
        }

    # DCP: save under IIG, load under GGG (fresh, perturbed), compare, then one more step on each.
    src, src_opt = _paro_net(mesh, device, "IIG", "ho_ring")
    _paro_train(src, src_opt, device, range(2), accum, max_norm)
    dcp.save({"model": get_model_state_dict(src), "optim": get_optimizer_state_dict(src, src_opt)},
             checkpoint_id=str(ckpt))
    # Snapshots are copies: on one rank a full state dict may alias the live tensors.
    want_model = _copied(get_model_state_dict(src, options=full))
    want_optim = _copied(get_optimizer_state_dict(src, src_opt, options=full)["state"])
    _paro_train(src, src_opt, device, range(2, 3), accum, max_norm)
    want_next = _copied(get_model_state_dict(src, options=full))
    dst, dst_opt = _paro_net(mesh, device, "GGG", "default")
    with torch.no_grad():
        for p in dst.parameters():  # the load, not the seed, must set the values
            p.add_(1.0)
    state = {"model": get_model_state_dict(dst), "optim": get_optimizer_state_dict(dst, dst_opt)}
    dcp.load(state, checkpoint_id=str(ckpt))
    set_model_state_dict(dst, state["model"])
    set_optimizer_state_dict(dst, dst_opt, state["optim"])
    got_optim = get_optimizer_state_dict(dst, dst_opt, options=full)["state"]
    result["dcp"] = {
        "model_diff": _max_diff(get_model_state_dict(dst, options=full), want_model),
        "optim_diff": max(_max_diff(got_optim[fqn], st) for fqn, st in want_optim.items()),
        "optim_keys": sorted({k for st in want_optim.values() for k in st}),
    }
    _paro_train(dst, dst_opt, device, range(2, 3), accum, max_norm)
    result["dcp"]["next_diff"] = _max_diff(get_model_state_dict(dst, options=full), want_next)
    if device_type == "cuda":
        torch.cuda.synchronize()
    out.write_text(json.dumps(result))
    dist.destroy_process_group()


def _torchrun(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("device", DEVICES)
def test_one_rank_trains_clips_and_checkpoints(device: str, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = _torchrun([__file__, "one_rank", device, str(out), str(tmp_path / "ckpt")])
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"torchrun exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    r = json.loads(out.read_text())
    assert r["backend"] == ("nccl" if device == "cuda" else "gloo")
    assert r["collective_device"] == ("cuda:0" if device == "cuda" else "cpu")
    assert r["objects"] == [{"from": 0}, [["x", 1]]]
    assert r["timed"] >= 0
    for case, e in r["engine"].items():
        assert e["device"].startswith(device), (case, e)
        assert e["norm_diff"] < 1e-5 and e["param_diff"] < 1e-5, (case, e)
    d = r["dcp"]
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(d["optim_keys"]), d
    assert d["model_diff"] == 0 and d["optim_diff"] == 0 and d["next_diff"] < 1e-6, d


def test_paro_probe_refuses_a_single_rank(tmp_path: Path) -> None:
    proc = _torchrun(["-m", "paro_fsdp", "probe", "--out", str(tmp_path / "cal.json")], timeout=300)
    assert proc.returncode != 0
    assert "paro probe needs at least 2 ranks" in proc.stdout + proc.stderr
    assert not (tmp_path / "cal.json").exists()


# ----------------------------------------------------------------------------- torchtitan, one GPU

STEP_LINE = re.compile(r"step:\s*(\d+)\s+loss:\s*([-+0-9.eE]+|nan|inf)")


def _torchtitan(dump: Path, *extra: str, ac: str | None = None) -> tuple[subprocess.CompletedProcess, dict[int, float]]:
    """The debug job on one GPU with torchtitan's own train script: the TOML on torchtitan 0.2.2,
    the config function of the same name on 0.3 (``ac``: the activation-checkpointing mode)."""
    if INSTALLED == "0.3.0":
        job = ["--module", "torchtitan_patch.v0_3", "--config", "llama3_debug_paro", "--dump_folder", str(dump)]
        tail = [f"activation-checkpoint:{ac}"] if ac else []
    else:
        job = ["--job.config_file", str(CONFIG), "--job.dump_folder", str(dump)]
        tail = ["--activation_checkpoint.mode", ac] if ac else []
    proc = _torchrun([
        "-m", "torchtitan.train", *job,
        "--training.steps", "5", "--training.local_batch_size", "2",
        "--training.global_batch_size", "4",  # 2 micro-batches per step on the one rank
        "--parallelism.data_parallel_replicate_degree", "1", "--parallelism.data_parallel_shard_degree", "1",
        "--metrics.no-enable-tensorboard", "--metrics.disable_color_printing", *extra, *tail,
    ])
    losses = {int(s): float(v) for s, v in STEP_LINE.findall(proc.stdout + proc.stderr)}
    return proc, losses


@needs_cuda
@needs_any_torchtitan
def test_torchtitan_debug_run_with_paro_on_one_gpu(tmp_path: Path) -> None:
    proc, losses = _torchtitan(tmp_path, "--parallelism.paro_strategy", "IIG", "--parallelism.paro_comm", "ho_ring",
                               "--checkpoint.enable", "--checkpoint.interval", "5")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-8000:]
    assert "Applied PaRO" in log and "paro comm/step" in log, log[-4000:]
    assert sorted(losses) == [1, 2, 3, 4, 5], log[-4000:]
    assert all(math.isfinite(v) for v in losses.values()) and losses[5] < losses[1], losses
    assert (tmp_path / "checkpoint" / "step-5").is_dir(), "the full checkpoint (model and PaRO optimizer) was saved"


@needs_cuda
@needs_any_torchtitan
def test_torchtitan_bf16_with_activation_checkpointing_and_compile_on_one_gpu(tmp_path: Path) -> None:
    """The shipped GPU configs' feature set (bf16, selective AC, compile, full checkpoints) on one GPU."""
    proc, losses = _torchtitan(tmp_path, "--parallelism.paro_strategy", "IIG", "--parallelism.paro_comm", "ho_ring",
                               "--training.mixed_precision_param", "bfloat16", "--compile.enable",
                               "--compile.components", "model,loss",
                               "--checkpoint.enable", "--checkpoint.interval", "5",
                               "--checkpoint.no-last-save-model-only", ac="selective")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-8000:]
    assert sorted(losses) == [1, 2, 3, 4, 5] and losses[5] < losses[1], (losses, log[-4000:])
    assert (tmp_path / "checkpoint" / "step-5" / ".metadata").is_file()


@needs_cuda
@needs_any_torchtitan
def test_torchtitan_auto_on_one_gpu_says_it_needs_two_ranks(tmp_path: Path) -> None:
    proc, losses = _torchtitan(tmp_path, "--parallelism.paro_strategy", "auto")
    assert proc.returncode != 0 and not losses
    assert "'auto' needs at least 2 data-parallel ranks" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-4000:]


if __name__ == "__main__":
    if sys.argv[1] == "one_rank":
        _one_rank(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
