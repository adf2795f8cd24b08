"""Gradient scale: plain SGD against one process, and every rank's synchronized gradient slice.

AdamW's update is invariant to a constant gradient scale (up to its eps), so the AdamW parity
tests in ``test_engine.py`` cannot see a wrong mean: dividing by m instead of n, or counting
a group's copy twice. SGD without momentum moves parameters by ``lr * grad``, so any scale
error shows up in the parameters. For all 14 strategies on 2x2 and 2x4 gloo meshes, with
A = 2 micro-steps per optimizer step, each mesh shape runs one process group and checks:

- parameters after a few SGD steps equal a single-process SGD run on the union of all ranks'
  micro-batches (mean over n ranks and A micro-batches);
- before each step, every rank's synchronized gradient slice (at O granularity) equals the
  reference full gradient on the elements that rank owns, and the slices cover every element
  exactly once per group (O=I), once in the mesh (O=G) or on every rank (O=N);
- with ``set_gradient_divide_factor(f)`` the engine divides the sum by f: a per-rank loss
  scaled by f/n trains (and has gradient slices) exactly like the reference.

Tolerances, per tensor ``max|a - b| / max|b|``. Parameters: 1e-6. The engine and the
reference add the same n*A fp32 gradient terms in different orders and divide at different
points, so gradients differ by a few ulps and parameters by about one ulp of their largest
element per step: measured 1.5e-7 to 3.1e-7 on both meshes. Gradient slices: 1e-5 (the
whole tensor's largest element is the scale, so a rank's small piece is not judged alone);
measured at most 4.9e-7. A wrong scale is far outside both: dividing by m instead of n
gives 0.64 (parameters) and 3.1 (gradients, the trajectories having diverged), and even a
gradient 1e-4 too large gives 7.3e-5 and 2.3e-4 (on 2x2), because LayerNorm biases start at zero
and a tensor made only of SGD updates carries the scale error whole.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, distribute_tensor

from dist_utils import run_distributed
from models import Net, batch, loss_fn
from paro_fsdp import Granularity, ParoOptimizer, ParoStrategy, paro_parallelize

CODES = [str(s) for s in ParoStrategy.all_valid()]
STEPS, ACCUM, LR = 3, 2, 0.1
DIVIDE_STEPS, DIVIDE_FACTOR = 1, 3.0  # f neither 1, m nor n: a factor that is ignored shows
PARAM_RTOL, GRAD_RTOL = 1e-6, 1e-5


def _rel(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """max|got - want| / max|scale| (``scale`` defaults to ``want``; floored at 1e-12)."""
    scale = want if scale is None else scale
    return ((got.double() - want.double()).abs().max() / scale.double().abs().max().clamp_min(1e-12)).item()


def _reference(n: int, steps: int) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """Single-process SGD on the mean over n ranks and ACCUM micro-batches: the parameters after
    each step and the full gradient before each step."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    params, grads = [], []
    for s in range(steps):
        loss = sum(loss_fn(model, batch(s, a, r)) for a in range(ACCUM) for r in range(n)) / (ACCUM * n)
        loss.backward()
        grads.append({k: p.grad.detach().clone() for k, p in model.named_parameters()})
        opt.step()
        opt.zero_grad()
        params.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return params, grads


def _owned_grads(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """This rank's synchronized gradient at O granularity: ``{name: (flat indices, values)}``,
    indices into the full (unsharded) parameter.

    Private API, kept to this one function: the engine holds the averaged gradient of each
    unit in ``Unit.optim_grad`` (a compact buffer of the owned chunks) and
    ``RowLayout.slices(O)`` says which part of which parameter's local storage each piece
    of it is. The local storage is FSDP2's dim-0 shard of the parameter; a DTensor of flat
    indices distributed the same way (locally, no communication) maps it to the full tensor.
    """
    from paro_fsdp.parallelize import paro_state  # private: the engine's state

    state = paro_state(model)
    names = {id(p): name for name, p in model.named_parameters()}
    level = state.strategy.optim
    pieces: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    index_of: dict[int, torch.Tensor] = {}
    for unit in state.units:
        if unit.optim_grad is None:
            continue
        for sl in unit.layout.slices(level):
            param = sl.region.param
            if id(param) not in index_of:
                full = torch.arange(param.numel(), dtype=torch.int64).view(param.shape)
                if isinstance(param, DTensor):
                    local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
                    full = local.to_local()
                    assert full.shape == param.to_local().shape, (full.shape, param.to_local().shape)
                index_of[id(param)] = full.reshape(-1)
            idx = index_of[id(param)][sl.param_start : sl.param_start + sl.numel]
            val = unit.optim_grad[sl.compact_start : sl.compact_start + sl.numel]
            pieces.setdefault(names[id(param)], []).append((idx, val.detach()))
    return {k: (torch.cat([i for i, _ in v]), torch.cat([x for _, x in v])) for k, v in pieces.items()}


def _to_numpy(tree):
    """Tensors leave the worker as numpy arrays (pickled by value: the worker exits before the
    parent would map a shared tensor's memory)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().numpy().copy()
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_numpy(v) for v in tree)
    return tree


def _to_torch(tree):
    if isinstance(tree, np.ndarray):
        return torch.from_numpy(tree)
    if isinstance(tree, dict):
        return {k: _to_torch(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_torch(v) for v in tree)
    return tree


def _train(mesh, code: str, steps: int, divide_factor: float | None) -> dict:
    """SGD with ACCUM micro-steps; gradient slices before each step, full parameters after."""
    rank, n = dist.get_rank(), mesh.size()
    torch.manual_seed(0)
    model = Net()
    model = paro_parallelize(model, mesh, code, blocks=model.units())
    scale = 1.0
    if divide_factor is not None:
        model.set_gradient_divide_factor(divide_factor)
        scale = divide_factor / n  # sum / f of losses scaled by f / n is the mean over n
    opt = ParoOptimizer(model, torch.optim.SGD, lr=LR)
    grads = []
    for s in range(steps):
        for a in range(ACCUM):
            model.set_requires_gradient_sync(a == ACCUM - 1)
            (loss_fn(model, batch(s, a, rank)) * scale / ACCUM).backward()
        grads.append(_owned_grads(model))
        opt.step()
        opt.zero_grad()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return _to_numpy({"params": full if rank == 0 else None, "grads": grads})


def _worker(g: int, m: int) -> dict:
    mesh = init_device_mesh("cpu", (g, m), mesh_dim_names=("dp_replicate", "dp_shard"))
    out = {}
    for code in CODES:
        out[code] = _train(mesh, code, STEPS, None)
        out[f"{code}/divide"] = _train(mesh, code, DIVIDE_STEPS, DIVIDE_FACTOR)
    return out


@pytest.fixture(scope="module", params=[(2, 2), (2, 4)], ids=["2x2", "2x4"])
def mesh_shape(request):
    return request.param


@pytest.fixture(scope="module")
def runs(mesh_shape):
    g, m = mesh_shape
    return _to_torch(run_distributed(_worker, g * m, g, m))


@pytest.fixture(scope="module")
def reference(mesh_shape):
    g, m = mesh_shape
    return _reference(g * m, STEPS)


def _param_diff(run: dict, ref: dict[str, torch.Tensor]) -> float:
    return max(_rel(run["params"][k], v) for k, v in ref.items())


def _check_slices(per_rank: list[dict], key: str, step: int, want: dict[str, torch.Tensor],
                  code: str, g: int, m: int) -> float:
    """Slices cover each element once per owner set and match the reference there; the worst
    relative difference."""
    level = ParoStrategy.parse(code).optim
    n = g * m
    owner_sets = {Granularity.N: [[r] for r in range(n)],
                  Granularity.I: [list(range(j * m, (j + 1) * m)) for j in range(g)],
                  Granularity.G: [list(range(n))]}[level]
    worst = 0.0
    for name, ref in want.items():
        flat = ref.reshape(-1)
        for owners in owner_sets:
            parts = [per_rank[r][key]["grads"][step].get(name) for r in owners]
            idx = torch.cat([p[0] for p in parts if p is not None])
            val = torch.cat([p[1] for p in parts if p is not None])
            assert torch.equal(idx.sort().values, torch.arange(flat.numel())), (
                f"{key} step {step} {name}: ranks {owners} own {idx.numel()} elements of {flat.numel()} "
                f"(each must be owned exactly once)")
            # relative to the whole tensor's largest element: one rank's piece may be all small
            worst = max(worst, _rel(val, flat[idx], scale=flat))
    return worst


@pytest.mark.parametrize("code", CODES)
def test_sgd_matches_single_process(runs, reference, code):
    params, _ = reference
    diff = _param_diff(runs[0][code], params[STEPS - 1])
    assert diff <= PARAM_RTOL, f"{code}: SGD parameters differ from the reference by {diff:.3g} (relative)"


@pytest.mark.parametrize("code", CODES)
def test_gradient_slices_match_reference(runs, reference, mesh_shape, code):
    _, grads = reference
    for step in range(STEPS):
        worst = _check_slices(runs, code, step, grads[step], code, *mesh_shape)
        assert worst <= GRAD_RTOL, f"{code} step {step}: gradient slices differ by {worst:.3g} (relative)"


@pytest.mark.parametrize("code", CODES)
def test_gradient_divide_factor_with_sgd(runs, reference, mesh_shape, code):
    params, grads = reference
    key = f"{code}/divide"
    for step in range(DIVIDE_STEPS):
        worst = _check_slices(runs, key, step, grads[step], code, *mesh_shape)
        assert worst <= GRAD_RTOL, f"{code} f={DIVIDE_FACTOR} step {step}: gradient slices differ by {worst:.3g}"
    diff = _param_diff(runs[0][key], params[DIVIDE_STEPS - 1])
    assert diff <= PARAM_RTOL, f"{code} f={DIVIDE_FACTOR}: SGD parameters differ by {diff:.3g} (relative)"
