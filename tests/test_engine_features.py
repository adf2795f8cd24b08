"""Clipping, frozen parameters, mixed precision, checkpoints, degenerate meshes, the copies of
P=N units and bad input, all in one 4-rank gloo process group."""

from __future__ import annotations

import logging
import math
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
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.utils._python_dispatch import TorchDispatchMode

from dist_utils import run_distributed
from models import Net, batch, loss_fn
from paro_fsdp import ParoOptimizer, ParoStrategy, clip_grad_norm_, comm_stats, memory_stats, paro_parallelize
from paro_fsdp.comm.stats import current_phase
from paro_fsdp.formulas import Topology
from paro_oracle import comm_bytes
from paro_fsdp.parallelize import paro_state
from paro_fsdp.transitions import phase_plan

CODES = [str(s) for s in ParoStrategy.all_valid()]
FULL = StateDictOptions(full_state_dict=True)


def _mesh(g: int, m: int):
    return init_device_mesh("cpu", (g, m), mesh_dim_names=("dp_replicate", "dp_shard"))


def _build(mesh, code: str, **kwargs):
    torch.manual_seed(0)
    model = Net()
    return paro_parallelize(model, mesh, code, blocks=model.units(), **kwargs)


def _ddp_reference(steps: int, n: int = 4, clip: float | None = None, optimizer_class: type = torch.optim.AdamW,
                   lr: float = 1e-2) -> dict[str, torch.Tensor]:
    """One process, AdamW (or ``optimizer_class``) on the mean over n ranks' batches (what DDP computes)."""
    torch.manual_seed(0)
    ref = Net()
    opt = optimizer_class(ref.parameters(), lr=lr)
    for s in range(steps):
        (sum(loss_fn(ref, batch(s, 0, r)) for r in range(n)) / n).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        opt.step()
        opt.zero_grad()
    return ref.state_dict()


def _max_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    return max((got[k].float() - v.float()).abs().max().item() for k, v in want.items())


def _train(model, opt, steps: int, start: int = 0, clip: float | None = None) -> list[float]:
    rank, norms = dist.get_rank(), []
    for s in range(start, start + steps):
        loss_fn(model, batch(s, 0, rank)).backward()
        if clip is not None:
            norms.append(clip_grad_norm_(model, clip).item())
        opt.step()
        opt.zero_grad()
    return norms


def _clipping() -> dict:
    """Norm of all-ones gradients is sqrt(trainable count); clipped training matches DDP + torch clipping."""
    mesh, rank, n = _mesh(2, 2), dist.get_rank(), 4
    ones_norm, clip_diff = {}, {}
    ref = _ddp_reference(2, n, clip=0.05)
    for code in CODES:
        model = _build(mesh, code)
        opt = ParoOptimizer(model, torch.optim.AdamW, lr=1e-2)
        loss_fn(model, batch(0, 0, rank)).backward()
        for unit in paro_state(model).units:
            if unit.optim_grad is not None:
                unit.optim_grad.fill_(1.0)
                _zero_padding(unit)
        ones_norm[code] = clip_grad_norm_(model, 1e9).item()
        opt.zero_grad()
        _train(model, opt, 2, clip=0.05)
        full = get_model_state_dict(model, options=FULL)
        clip_diff[code] = _max_diff(full, ref)
    trainable = sum(p.numel() for p in Net().parameters())
    return {"ones": ones_norm, "clip_diff": clip_diff, "trainable": trainable}


class _GradientPasses(TorchDispatchMode):
    """The in-place divisions and multiplications run, while active, on tensors of ``sizes`` elements."""

    def __init__(self, sizes: set[int]) -> None:
        super().__init__()
        self.sizes, self.ops = sizes, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - dispatch protocol
        if func._schema.name in ("aten::div_", "aten::mul_") and args[0].numel() in self.sizes:
            self.ops.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def _clipped_sgd() -> dict:
    """Clipped SGD, where a wrong gradient scale shows (AdamW's update hides it), against one
    process with torch's clipping; and the element-wise passes the clip and the step make over
    the units' gradients: one scaling each, the division by n folded into it."""
    mesh, rank, n = _mesh(2, 2), dist.get_rank(), 4
    ref = _ddp_reference(2, n, clip=0.05, optimizer_class=torch.optim.SGD, lr=0.5)
    out = {}
    for code in CODES:
        model = _build(mesh, code)
        opt = ParoOptimizer(model, torch.optim.SGD, lr=0.5)
        loss_fn(model, batch(0, 0, rank)).backward()
        grads = [g for g, _ in (unit.summed_grad() for unit in paro_state(model).units) if g is not None]
        with _GradientPasses({g.numel() for g in grads}) as passes:
            clip_grad_norm_(model, 0.05)
            opt.step()
        opt.zero_grad()
        _train(model, opt, 1, start=1, clip=0.05)
        out[code] = {"diff": _max_diff(get_model_state_dict(model, options=FULL), ref), "passes": passes.ops,
                     "units": len(grads)}
    return out


def _zero_padding(unit) -> None:
    """Keep the all-ones pattern on real elements only: FSDP's padding is not a parameter."""
    level = unit.state.strategy.optim
    mask = torch.zeros_like(unit.optim_grad)
    for sl in unit.layout.slices(level):
        mask[sl.compact_start : sl.compact_start + sl.numel] = 1
    unit.optim_grad.mul_(mask)


def _frozen() -> dict:
    """Frozen parameters get no gradient or optimizer state, and under P=N never move."""
    mesh, rank = _mesh(2, 2), dist.get_rank()
    out = {}
    for code in CODES:
        torch.manual_seed(0)
        model = Net(dim=16, depth=2, in_features=16, out_features=16)
        # Frozen parameters beside trainable ones in a unit.
        model.layers[0].norm.requires_grad_(False)
        model.head.bias.requires_grad_(False)
        psi = sum(p.numel() for p in model.parameters())
        psi_t = sum(p.numel() for p in model.parameters() if p.requires_grad)
        model = paro_parallelize(model, mesh, code, blocks=model.units())
        frozen_before = {k: v.clone() for k, v in get_model_state_dict(model, options=FULL).items()
                         if "norm" in k and "layers.0" in k or k == "head.bias"}
        opt = ParoOptimizer(model, torch.optim.AdamW, lr=1e-2)
        comm_stats(model).reset()
        model(torch.randn(4, 16)).square().mean().backward()
        opt.step()
        model.wait_parameters()  # the step's sync_p completes its last phase here
        measured = comm_stats(model).as_dict()
        frozen_after = get_model_state_dict(model, options=FULL)
        out[code] = {
            "bytes": measured,
            "expected": comm_bytes(code, Topology(2, 2), psi, psi_t, accum=1),
            "optim": memory_stats(model)["optim"],
            "frozen_unchanged": all(torch.equal(v, frozen_after[k]) for k, v in frozen_before.items()),
            "optim_expected": 8 * psi_t * ParoStrategy.parse(code).optim.fraction(2, 4),
        }
        opt.zero_grad()
        # A unit that is entirely frozen: still gathered in forward and backward, through the
        # engine's counted (hierarchical for P=G) all-gather.
        torch.manual_seed(0)
        model = Net(dim=16, depth=2, in_features=16, out_features=16)
        model.inp.requires_grad_(False)
        psi_t = sum(p.numel() for p in model.parameters() if p.requires_grad)
        model = paro_parallelize(model, mesh, code, blocks=model.units())
        opt = ParoOptimizer(model, torch.optim.AdamW, lr=1e-2)
        model(torch.randn(4, 16)).square().mean().backward()
        opt.step()
        out[code]["frozen_unit_gather"] = comm_stats(model).as_dict()["param_gather"]
        out[code]["frozen_unit_expected"] = comm_bytes(code, Topology(2, 2), psi, psi_t)["param_gather"]
    return out


def _mixed_precision() -> dict:
    """bf16 compute with fp32 reduction: every strategy trains the same as DDP-like NNN."""
    mesh = _mesh(2, 2)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    finals, losses = {}, {}
    for code in ("NNN", "IIG", "GGG", "NIG", "GIG", "INI"):
        model = _build(mesh, code, mp_policy=policy)
        opt = ParoOptimizer(model, torch.optim.AdamW, lr=1e-2)
        rank, curve = dist.get_rank(), []
        for s in range(4):
            for a in range(2):
                model.set_requires_gradient_sync(a == 1)
                loss = loss_fn(model, batch(0, a, rank))
                (loss / 2).backward()
            curve.append(loss.item())
            opt.step()
            opt.zero_grad()
        finals[code] = get_model_state_dict(model, options=FULL)
        losses[code] = curve
    diffs = {c: _max_diff(sd, finals["NNN"]) for c, sd in finals.items()}
    return {"diffs": diffs, "losses": losses}


def _checkpoint(path: str) -> dict:
    """Save under IIG on 2x2, load under GGG on 1x4 and NIG on 2x2: same parameters, state and next step."""
    rank = dist.get_rank()

    def snapshot(model, opt):
        return get_model_state_dict(model, options=FULL), get_optimizer_state_dict(model, opt, options=FULL)

    src = _build(_mesh(2, 2), "IIG")
    src_opt = ParoOptimizer(src, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    _train(src, src_opt, 2)
    dcp.save({"model": get_model_state_dict(src), "optim": get_optimizer_state_dict(src, src_opt)}, checkpoint_id=path)
    want_model, want_optim = snapshot(src, src_opt)
    _train(src, src_opt, 1, start=2)
    want_next = get_model_state_dict(src, options=FULL)
    result = {}
    for code, shape in (("GGG", (1, 4)), ("NIG", (2, 2)), ("NNN", (4, 1))):
        dst = _build(_mesh(*shape), code)
        dst_opt = ParoOptimizer(dst, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
        for p in dst.parameters():  # make sure the load, not the seed, sets the values
            p.data.add_(1.0)
        state = {"model": get_model_state_dict(dst), "optim": get_optimizer_state_dict(dst, dst_opt)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(dst, state["model"])
        set_optimizer_state_dict(dst, dst_opt, state["optim"])
        got_model, got_optim = snapshot(dst, dst_opt)
        model_diff = _max_diff(got_model, want_model)
        optim_diff = 0.0
        for fqn, st in want_optim["state"].items():
            for key, v in st.items():
                optim_diff = max(optim_diff, (got_optim["state"][fqn][key].float() - v.float()).abs().max().item())
        flat = StateDictOptions(flatten_optimizer_state_dict=True)
        fresh_model = _build(_mesh(*shape), code)
        fresh = ParoOptimizer(fresh_model, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
        set_optimizer_state_dict(fresh_model, fresh, get_optimizer_state_dict(dst, dst_opt, options=flat), options=flat)
        _, fresh_optim = snapshot(fresh_model, fresh)
        for fqn, st in got_optim["state"].items():
            for key, v in st.items():
                optim_diff = max(optim_diff, (fresh_optim["state"][fqn][key].float() - v.float()).abs().max().item())
        _train(dst, dst_opt, 1, start=2)
        next_diff = _max_diff(get_model_state_dict(dst, options=FULL), want_next)
        result[code] = (model_diff, optim_diff, next_diff)
    return result


def _degenerate() -> dict:
    out: dict = {"log": []}

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            out["log"].append(record.getMessage())

    logger = logging.getLogger("paro_fsdp")
    logger.addHandler(Collect())
    logger.setLevel(logging.INFO)
    for shape, code in (((1, 4), "IIG"), ((4, 1), "IIG"), ((1, 4), "NII"), ((4, 1), "III")):
        model = _build(_mesh(*shape), code)
        opt = ParoOptimizer(model, torch.optim.AdamW, lr=1e-2)
        _train(model, opt, 2)
        out[f"{shape}/{code}"] = str(paro_state(model).strategy)
    ref = _ddp_reference(2)
    full = get_model_state_dict(model, options=FULL)
    out["diff"] = _max_diff(full, ref)
    return out


def _tensor_parallel() -> dict:
    """Parameters that are TP DTensors: same training and clipping norm as one process."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    world = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
    dp_rank = world["dp_replicate"].get_local_rank()

    def tp_batch(step: int, r: int) -> torch.Tensor:
        return torch.randn(4, 16, generator=torch.Generator().manual_seed(10 * step + r))

    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(*(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                                         torch.nn.Linear(32, 16)) for _ in range(2)))

    ref = make()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    ref_norms = []
    for s in range(2):
        (sum(ref(tp_batch(s, r)).square().mean() for r in range(2)) / 2).backward()
        ref_norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1).item())
        ref_opt.step()
        ref_opt.zero_grad()
    out = {}
    for code in ("NNN", "IIG", "GGG", "NNG"):
        model = make()
        for block in model:
            parallelize_module(block, world["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        model = paro_parallelize(model, world["dp_replicate", "dp_shard"], code, blocks=list(model))
        opt = ParoOptimizer(model, torch.optim.AdamW, lr=1e-2)
        norms = []
        for s in range(2):
            model(tp_batch(s, dp_rank)).square().mean().backward()
            norms.append(clip_grad_norm_(model, 0.1).item())
            opt.step()
            opt.zero_grad()
        full = get_model_state_dict(model, options=FULL)
        diff = _max_diff(full, ref.state_dict())
        out[code] = {"norm_diff": max(abs(a - b) for a, b in zip(norms, ref_norms)), "param_diff": diff}
    return out


def _ho_ring() -> dict:
    """comm="ho_ring" trains the same parameters as comm="default" and sends the same bytes; the
    phases in which the engine calls a global collective."""
    mesh, rank = _mesh(2, 2), dist.get_rank()
    out = {}
    for code in CODES:
        runs, global_phases = {}, set()
        for comm in ("default", "ho_ring"):
            model = _build(mesh, code, comm=comm)
            collectives = paro_state(model).collectives
            for name in ("all_gather", "reduce_scatter", "all_reduce"):
                def record(*args, _call=getattr(collectives, name), **kwargs):
                    global_phases.add(current_phase())
                    return _call(*args, **kwargs)
                setattr(collectives, name, record)
            opt = ParoOptimizer(model, torch.optim.AdamW, lr=1e-2)
            comm_stats(model).reset()
            for s in range(2):
                for a in range(2):
                    model.set_requires_gradient_sync(a == 1)
                    (loss_fn(model, batch(s, a, rank)) / 2).backward()
                opt.step()
                opt.zero_grad()
            assert paro_state(model).collectives.name == comm
            runs[comm] = (get_model_state_dict(model, options=FULL), comm_stats(model).as_dict())
        (a_sd, a_bytes), (b_sd, b_bytes) = runs["default"], runs["ho_ring"]
        out[code] = {"diff": _max_diff(b_sd, a_sd), "global_phases": sorted(global_phases),
                     "same_bytes": a_bytes == b_bytes, "inter": b_bytes["param_gather"]["inter"]
                     + b_bytes["grad_reduce"]["inter"] + b_bytes["sync_g"]["inter"] + b_bytes["sync_p"]["inter"]}
    return out


def _divide_factor() -> dict:
    """set_gradient_divide_factor(1.0) sums gradients: a loss pre-divided by n trains like DDP."""
    mesh, rank = _mesh(2, 2), dist.get_rank()
    ref = _ddp_reference(2)
    out = {}
    for code in ("NIG", "GGG", "NNI"):
        model = _build(mesh, code)
        model.set_gradient_divide_factor(1.0)
        opt = ParoOptimizer(model, torch.optim.AdamW, lr=1e-2)
        for s in range(2):
            (loss_fn(model, batch(s, 0, rank)) / 4).backward()
            opt.step()
            opt.zero_grad()
        full = get_model_state_dict(model, options=FULL)
        out[code] = _max_diff(full, ref)
    return out


class _Divisions(TorchDispatchMode):
    """Sizes of the tensors made by out-of-place divisions while active."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - dispatch protocol
        out = func(*args, **(kwargs or {}))
        if func._schema.name == "aten::div":
            self.sizes.append(out.numel())
        return out


def _gradient_divisions() -> dict:
    """The sizes of unit gradients divided out of place in a backward (FSDP2 copies a one-rank
    unit's gradient through ``input / factor`` whenever a divide factor is set)."""
    mesh, rank = _mesh(2, 2), dist.get_rank()
    out = {}
    for code in CODES:
        model = _build(mesh, code)
        rows = {sum(p.numel() for p in unit.parameters()) for unit in model.units()}
        with _Divisions() as divisions:
            loss_fn(model, batch(0, 0, rank)).backward()
        out[code] = [n for n in divisions.sizes if n in rows]
    return out


P_N_CODES = [c for c in CODES if c.startswith("N")]


def _hot_path_copies() -> dict:
    """Bytes copied by two micro-steps of forward and backward (the second one ending the
    window), beyond what the same loop copies on the unwrapped model: P=N units compute on their
    stored parameters and accumulate their gradients in the row the engine takes, as DDP does."""
    from benchmarks.local_copies import CopyCounter

    mesh, rank = _mesh(2, 2), dist.get_rank()

    def copied(model, sync) -> int:
        for _ in range(2):  # the second window is measured: lazy initialization is done by then
            with CopyCounter() as counter:
                for a in range(2):
                    sync(a == 1)
                    loss_fn(model, batch(0, a, rank)).backward()
        return counter.bytes

    torch.manual_seed(0)
    plain = Net()
    baseline = copied(plain, lambda _: plain.zero_grad())
    out = {}
    for code in P_N_CODES:
        model = _build(mesh, code)
        opt = ParoOptimizer(model, torch.optim.SGD, lr=0.0)

        def sync(last, model=model, opt=opt):
            if not last:
                opt.zero_grad()
            model.set_requires_gradient_sync(last)

        out[code] = copied(model, sync) - baseline
    return out


def _step_after_unsynchronized_backward() -> dict:
    """P=N units keep their gathered parameters through an accumulation window. A step taken
    after a backward that did not end the window must still reach the next forward: its loss
    equals that of a run without that backward (of a zero loss, so the step is the same)."""
    mesh, rank = _mesh(2, 2), dist.get_rank()
    out = {}
    for code in P_N_CODES:
        losses = []
        for extra in (False, True):
            model = _build(mesh, code)
            opt = ParoOptimizer(model, torch.optim.SGD, lr=0.5)
            loss_fn(model, batch(0, 0, rank)).backward()
            if extra:
                model.set_requires_gradient_sync(False)
                (0 * loss_fn(model, batch(0, 1, rank))).backward()  # gathers, adds no gradient
                model.set_requires_gradient_sync(True)
            opt.step()
            with torch.no_grad():
                losses.append(loss_fn(model, batch(1, 0, rank)).item())
        out[code] = losses
    return out


def _row_reuse() -> dict:
    """Where G=N, a unit that computes in place accumulates each window's gradient in the row
    the last window's step consumed: per window, where the units' gradients live (the held
    ``.grad`` views after the first micro-step) and the loss after the step, over three steps."""
    from paro_fsdp.fsdp_seam import fsdp_held_gradients

    mesh, rank = _mesh(2, 2), dist.get_rank()
    out = {}
    for code in ("NNN", "NNG"):
        model = _build(mesh, code)
        opt = ParoOptimizer(model, torch.optim.SGD, lr=0.5)
        addresses, losses = [], []
        for step in range(3):
            opt.zero_grad()
            for a in range(2):
                model.set_requires_gradient_sync(a == 1)
                loss_fn(model, batch(step, a, rank)).backward()
                if a == 0:
                    addresses.append([g.untyped_storage().data_ptr() for unit in paro_state(model).units
                                      for g in fsdp_held_gradients(unit.module)][:1])
            opt.step()
            with torch.no_grad():
                losses.append(loss_fn(model, batch(9, 0, rank)).item())
        out[code] = {"addresses": addresses, "losses": losses}
    out["reference"] = _sgd_reference(rank)
    return out


def _sgd_reference(rank: int) -> list[float]:
    """One process: SGD on each micro-step's mean over 4 ranks, summed over a window of 2, for
    3 steps; this rank's loss on a held-out batch after each."""
    torch.manual_seed(0)
    ref = Net()
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    losses = []
    for step in range(3):
        opt.zero_grad()
        sum(loss_fn(ref, batch(step, a, r)) for a in range(2) for r in range(4)).div(4).backward()
        opt.step()
        with torch.no_grad():
            losses.append(loss_fn(ref, batch(9, 0, rank)).item())
    return losses


def _buckets() -> dict:
    """Units per bucket cap (0, the input projection's bytes, one layer's, the default, 25 MiB
    for every strategy) for P = N strategies and one that gathers on 2 groups, and the SGD losses
    each trains to (as :func:`_sgd_reference`); NNN's units by default on one group."""
    mesh, rank = _mesh(2, 2), dist.get_rank()
    sizes = [sum(p.numel() * p.element_size() for p in block.parameters()) for block in Net().units()]
    caps = (0, sizes[0] / 2**20, sizes[1] / 2**20, None, 25.0)
    out: dict = {"reference": _sgd_reference(rank), "caps": caps}
    for code in ("NNN", "NIG", "NGG", "IIG"):
        for cap in caps:
            torch.manual_seed(0)
            model = Net()
            names = {id(m): n for n, m in model.named_modules()}
            model = paro_parallelize(model, mesh, code, blocks=model.units(), bucket_cap_mb=cap)
            units = [[names[id(m)] for m in unit.modules] for unit in paro_state(model).units]
            opt = ParoOptimizer(model, torch.optim.SGD, lr=0.5)
            losses = []
            for step in range(3):
                opt.zero_grad()
                for a in range(2):
                    model.set_requires_gradient_sync(a == 1)
                    loss_fn(model, batch(step, a, rank)).backward()
                opt.step()
                with torch.no_grad():
                    losses.append(loss_fn(model, batch(9, 0, rank)).item())
            out[f"{code}/{cap}"] = {"units": units, "losses": losses}
    torch.manual_seed(0)
    model = Net()
    names = {id(m): n for n, m in model.named_modules()}
    model = paro_parallelize(model, _mesh(1, 4), "NNN", blocks=model.units())
    out["NNN/one group"] = [[names[id(m)] for m in unit.modules] for unit in paro_state(model).units]
    return out


def _sync_p_window() -> dict:
    """A bounded sync_p window: the same training, at most that many units in flight after the
    step, the rest started in forward order (root first) as forward consumes them."""
    mesh, rank = _mesh(2, 2), dist.get_rank()
    out = {}
    for code in ("IIG", "NIG"):
        runs = {}
        for window in (None, 1, 2):
            torch.manual_seed(0)
            model = Net()  # the head stays with the root, which forward reads first
            model = paro_parallelize(model, mesh, code, blocks=[model.inp, *model.layers], sync_p_window=window)
            state = paro_state(model)
            started: list[int] = []
            for i, unit in enumerate(state.units):
                start = unit.start_params
                unit.start_params = lambda compact, _start=start, _i=i: (started.append(_i), _start(compact))[1]
            opt = ParoOptimizer(model, torch.optim.AdamW, lr=1e-2)
            in_flight, losses = [], []
            for s in range(3):
                loss = loss_fn(model, batch(s, 0, rank))
                losses.append(loss.item())
                loss.backward()
                opt.step()
                in_flight.append(sum(u.params_in_flight for u in state.units))
                opt.zero_grad()
            full = get_model_state_dict(model, options=FULL)  # waits for the last step's queue
            runs[window] = {"losses": losses, "in_flight": in_flight, "queued": len(state.sync_p_queue),
                            "first_started": started[:1], "started": len(started), "units": len(state.units),
                            "params": full}
        base = runs[None]
        out[code] = {w: {**{k: v for k, v in r.items() if k != "params"},
                         "diff": _max_diff(r["params"], base["params"])} for w, r in runs.items()}
    try:
        paro_parallelize(Net(), mesh, "IIG", sync_p_window=0)
        out["error"] = None
    except ValueError as e:
        out["error"] = str(e)
    return out


def _errors() -> dict:
    """Bad input raises an exception that names the problem."""
    msgs = {}
    mesh = _mesh(2, 2)

    def catch(key, fn):
        try:
            fn()
            msgs[key] = None
        except (ValueError, TypeError) as e:
            msgs[key] = str(e)

    flat = init_device_mesh("cpu", (4,), mesh_dim_names=("dp",))
    wrong = init_device_mesh("cpu", (2, 2), mesh_dim_names=("a", "b"))
    catch("mesh_1d", lambda: paro_parallelize(Net(), flat, "IIG"))
    catch("mesh_names", lambda: paro_parallelize(Net(), wrong, "IIG"))
    catch("strategy", lambda: paro_parallelize(Net(), mesh, "GNN"))
    catch("comm", lambda: paro_parallelize(Net(), mesh, "IIG", comm="nccl"))
    catch("chunks_without_ho_ring", lambda: paro_parallelize(Net(), mesh, "IIG", ho_ring_chunks=4))
    catch("chunks", lambda: paro_parallelize(Net(), mesh, "IIG", comm="ho_ring", ho_ring_chunks=0))
    msgs["chunks_set"] = paro_state(_build(mesh, "GGG", comm="ho_ring", ho_ring_chunks=3)).collectives.chunks
    catch("optimizer", lambda: ParoOptimizer(Net(), torch.optim.AdamW, lr=1e-3))
    twice = _build(mesh, "IIG")
    catch("twice", lambda: paro_parallelize(twice, mesh, "GGG"))
    catch("block", lambda: paro_parallelize(Net(), mesh, "IIG", blocks=[torch.nn.Linear(2, 2)]))
    catch("bucket", lambda: paro_parallelize(Net(), mesh, "NNN", bucket_cap_mb=-1))
    opt = ParoOptimizer(twice, torch.optim.AdamW, lr=1e-3)
    try:
        opt.step()
        msgs["step_without_backward"] = None
    except RuntimeError as e:
        msgs["step_without_backward"] = str(e)
    return msgs


def _all(path: str) -> dict:
    return {
        "clipping": _clipping(),
        "clipped_sgd": _clipped_sgd(),
        "frozen": _frozen(),
        "mixed": _mixed_precision(),
        "checkpoint": _checkpoint(path),
        "degenerate": _degenerate(),
        "tensor_parallel": _tensor_parallel(),
        "ho_ring": _ho_ring(),
        "divide_factor": _divide_factor(),
        "gradient_divisions": _gradient_divisions(),
        "hot_path_copies": _hot_path_copies(),
        "step_after_unsynchronized_backward": _step_after_unsynchronized_backward(),
        "row_reuse": _row_reuse(),
        "buckets": _buckets(),
        "sync_p_window": _sync_p_window(),
        "errors": _errors(),
    }


@pytest.fixture(scope="module")
def results():
    with tempfile.TemporaryDirectory() as path:
        return run_distributed(_all, 4, path)


@pytest.mark.parametrize("code", CODES)
def test_global_norm_counts_each_element_once(results, code):
    for r in results:
        assert r["clipping"]["ones"][code] == pytest.approx(math.sqrt(r["clipping"]["trainable"]), rel=1e-6)


@pytest.mark.parametrize("code", CODES)
def test_clipped_training_matches_torch_clipping(results, code):
    assert results[0]["clipping"]["clip_diff"][code] < 1e-5


@pytest.mark.parametrize("code", CODES)
def test_frozen_parameters(results, code):
    for rank, r in enumerate(results):
        run = r["frozen"][code]
        assert run["frozen_unchanged"]
        assert run["optim"] == run["optim_expected"], f"rank {rank}"
        for ph, links in run["expected"].items():
            for link, value in links.items():
                assert run["bytes"][ph][link] == pytest.approx(value, abs=0.5), f"rank {rank} {code} {ph}/{link}"
        for link, value in run["frozen_unit_expected"].items():
            assert run["frozen_unit_gather"][link] == pytest.approx(value, abs=0.5), f"rank {rank} {code} {link}"


def test_mixed_precision_strategies_agree(results):
    mixed = results[0]["mixed"]
    for code, diff in mixed["diffs"].items():
        assert diff < 2e-3, f"{code} drifts from NNN by {diff} under bf16 compute"
    assert mixed["losses"]["IIG"][-1] < mixed["losses"]["IIG"][0]


@pytest.mark.parametrize("code", ["GGG", "NIG", "NNN"])
def test_checkpoint_reshards_across_strategies(results, code):
    for r in results:
        model_diff, optim_diff, next_diff = r["checkpoint"][code]
        assert model_diff == 0.0
        assert optim_diff == 0.0
        assert next_diff < 1e-6


def test_degenerate_meshes(results):
    d = results[0]["degenerate"]
    assert d["(1, 4)/IIG"] == "GGG"
    assert d["(4, 1)/IIG"] == "NNG"
    assert d["(1, 4)/NII"] == "NGG"
    assert d["(4, 1)/III"] == "NNN"
    assert d["diff"] < 1e-5
    assert any("IIG on 1 group(s) x 4 rank(s) runs as GGG (I collapses to G)" in m for m in d["log"])
    assert any("IIG on 4 group(s) x 1 rank(s) runs as NNG (I collapses to N)" in m for m in d["log"])


@pytest.mark.parametrize("code", ["NNN", "IIG", "GGG", "NNG"])
def test_tensor_parallel_parameters(results, code):
    for rank, r in enumerate(results):
        run = r["tensor_parallel"][code]
        assert run["norm_diff"] < 1e-5, f"rank {rank}: clipping norm differs by {run['norm_diff']}"
        # TP sums partial matmuls in another order; Adam's first steps amplify that rounding.
        assert run["param_diff"] < 1e-4, f"rank {rank}: parameters differ by {run['param_diff']}"


@pytest.mark.parametrize("code", CODES)
def test_ho_ring_engine_matches_default(results, code):
    # The planner prices HO-Ring's overlap, and the benchmarks pair both collectives, for the
    # phases phase_plan calls global: they must be the phases where the engine calls one.
    planned = sorted(name for name, plan in phase_plan(ParoStrategy.parse(code)).items() if plan.is_global)
    for rank, r in enumerate(results):
        run = r["ho_ring"][code]
        assert run["diff"] < 1e-6, f"rank {rank}: HO-Ring parameters differ by {run['diff']}"
        assert run["same_bytes"], f"rank {rank}: HO-Ring bytes differ from the two-phase collectives"
        assert run["inter"] > 0
        assert run["global_phases"] == planned, f"rank {rank}: global collectives in {run['global_phases']}"


def test_gradient_divide_factor(results):
    for code, diff in results[0]["divide_factor"].items():
        assert diff < 1e-5, f"{code}: {diff}"


@pytest.mark.parametrize("code", CODES)
def test_clipped_sgd_matches_single_process(results, code):
    for rank, r in enumerate(results):
        assert r["clipped_sgd"][code]["diff"] < 1e-5, f"rank {rank}: {r['clipped_sgd'][code]['diff']}"


@pytest.mark.parametrize("code", CODES)
def test_clip_scales_each_gradient_in_one_pass(results, code):
    for rank, r in enumerate(results):
        got = r["clipped_sgd"][code]
        assert got["units"] and got["passes"] == ["aten::mul_"] * got["units"], f"rank {rank}: {got['passes']}"


@pytest.mark.parametrize("code", CODES)
def test_no_gradient_is_divided_out_of_place(results, code):
    assert results[0]["gradient_divisions"][code] == []


@pytest.mark.parametrize("code", P_N_CODES)
def test_unsharded_parameters_are_not_copied(results, code):
    for rank, r in enumerate(results):
        assert r["hot_path_copies"][code] <= 0, f"rank {rank}: {r['hot_path_copies'][code]} bytes copied"


@pytest.mark.parametrize("code", ["NNN", "NNG"])
def test_gradient_row_is_reused_across_windows_where_g_is_n(results, code):
    for rank, r in enumerate(results):
        addresses = r["row_reuse"][code]["addresses"]
        assert addresses[0] and addresses[1] == addresses[0] and addresses[2] == addresses[0], \
            f"rank {rank}: rows at {addresses}"


@pytest.mark.parametrize("code", ["NNN", "NNG"])
def test_reused_gradient_rows_train_as_fresh_ones(results, code):
    """The same SGD steps as one process on the ranks' mean (a row not zeroed between windows
    would carry the last window's gradient into the next)."""
    for rank, r in enumerate(results):
        reuse = r["row_reuse"]
        assert reuse[code]["losses"] == pytest.approx(reuse["reference"], rel=1e-5), f"rank {rank}"


@pytest.mark.parametrize("code", ["NNN", "NIG", "NGG", "IIG"])
def test_p_n_units_are_buckets_of_consecutive_blocks(results, code):
    b = results[0]["buckets"]
    none, inp, layer, default, ddp = (b[f"{code}/{cap}"]["units"] for cap in b["caps"])
    per_block = [["inp"], ["layers.0"], ["layers.1"], ["head"], [""]]
    assert none == per_block
    if code.startswith("N"):
        # the layers (one class) share a unit up to the cap; the Linear projections around
        # them (no neighbour of their class) keep a unit only if they reach the cap, else
        # they stay with the root's
        assert inp == [["inp"], ["layers.0"], ["layers.1"], [""]]
        assert layer == [["layers.0"], ["layers.1"], [""]]
        one = [["layers.0", "layers.1"], [""]]
        assert ddp == one
        # by default only where P = O = N on one group: elsewhere each unit's sync_p overlaps the
        # next forward, and a gradient reduction across groups the backward
        assert default == per_block
        assert b["NNN/one group"] == one
    else:  # P gathers: one unit per block bounds what is gathered at once
        assert inp == layer == default == ddp == per_block


@pytest.mark.parametrize("code", ["NNN", "NIG", "NGG", "IIG"])
def test_bucketed_units_train_as_one_unit_per_block(results, code):
    for rank, r in enumerate(results):
        b = r["buckets"]
        for cap in b["caps"]:
            assert b[f"{code}/{cap}"]["losses"] == pytest.approx(b["reference"], rel=1e-5), f"rank {rank} cap {cap}"


@pytest.mark.parametrize("code", P_N_CODES)
def test_step_after_unsynchronized_backward_reaches_the_next_forward(results, code):
    without, with_extra = results[0]["step_after_unsynchronized_backward"][code]
    assert with_extra == without


def test_bad_input_errors(results):
    e = results[0]["errors"]
    assert "dp_replicate" in e["mesh_1d"] and "ndim=1" in e["mesh_1d"]
    assert "('a', 'b')" in e["mesh_names"]
    assert "not effective" in e["strategy"] and "IIG" in e["strategy"]
    assert "comm='nccl'" in e["comm"] and "ho_ring" in e["comm"]
    assert "ho_ring_chunks=4 is HO-Ring's pipeline depth, valid only with comm='ho_ring'" in e["chunks_without_ho_ring"]
    assert "ho_ring_chunks=0 is invalid: HO-Ring's pipeline depth is a positive int" in e["chunks"]
    assert e["chunks_set"] == 3
    assert "was not wrapped by paro_parallelize" in e["optimizer"]
    assert "already parallelized" in e["twice"]
    assert "blocks[0]" in e["block"]
    assert "bucket_cap_mb must be a number >= 0 (0: one unit per block) or None (by strategy), got -1" in e["bucket"]
    assert "set_requires_gradient_sync(True)" in e["step_without_backward"]


def test_strategy_parsing():
    assert [str(s) for s in ParoStrategy.all_valid()] == [
        "NNN", "NNI", "NII", "INI", "III", "NNG", "NIG", "NGG", "ING", "IIG", "IGG", "GNG", "GIG", "GGG"]
    assert str(ParoStrategy.parse("iig")) == "IIG"
    aliases = {"ddp": "NNN", "zero1": "NNG", "zero2": "NGG", "zero3": "GGG", "fsdp": "GGG", "mics": "III", "hsdp": "III"}
    for alias, code in aliases.items():
        assert str(ParoStrategy.parse(alias.upper())) == code
    invalid = [p + g + o for p in "NIG" for g in "NIG" for o in "NIG"
               if p + g + o not in {str(s) for s in ParoStrategy.all_valid()}]
    assert len(invalid) == 13
    for code in invalid + ["XYZ", "II", ""]:
        with pytest.raises(ValueError, match="Valid codes: NNN"):
            ParoStrategy.parse(code)
    with pytest.raises(TypeError):
        ParoStrategy.parse(3)  # type: ignore[arg-type]


@pytest.mark.parametrize("code", ["IIG", "NIG"])
def test_sync_p_window(results, code):
    runs = results[0]["sync_p_window"][code]
    for window, run in runs.items():
        assert run["diff"] == 0.0 and run["losses"] == runs[None]["losses"]
        assert run["queued"] == 0 and run["started"] == 3 * run["units"]  # every update started once, per step
        assert run["first_started"] == [run["units"] - 1]  # the root: the next forward reads it first
        assert max(run["in_flight"]) == (run["units"] if window is None else window)
    assert "sync_p_window" in results[0]["sync_p_window"]["error"]
