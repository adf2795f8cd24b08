"""Gradient clipping by the true global norm, whatever the partition."""

from __future__ import annotations

import weakref
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor, Replicate

from paro_fsdp.parallelize import paro_state
from paro_fsdp.strategy import Granularity


# By the parameter's id (tensors compare elementwise, so they cannot key a weak dictionary).
_PARALLEL_DIMS: dict[int, tuple[weakref.ref, dict[str, dist.ProcessGroup]]] = {}


def _model_parallel_dims(param: torch.Tensor) -> dict[str, dist.ProcessGroup]:
    """Non-data-parallel mesh dims (e.g. TP) over which ``param``'s local shard is split, by name.

    FSDP2 puts its own data-parallel placement first; later dims come from the parameter's
    model-parallel mesh. Replicated dims hold identical gradients and are counted once. Kept per
    parameter: the norm is taken every step, and a parameter's placements do not change.
    """
    if not isinstance(param, DTensor):
        return {}
    kept = _PARALLEL_DIMS.get(id(param))
    if kept is not None and kept[0]() is param:
        return kept[1]
    mesh = param.device_mesh
    names = mesh.mesh_dim_names or tuple(str(d) for d in range(mesh.ndim))
    dims = {names[d]: mesh.get_group(d) for d in range(1, mesh.ndim) if not isinstance(param.placements[d], Replicate)}
    key = id(param)  # the entry leaves with the parameter
    _PARALLEL_DIMS[key] = (weakref.ref(param, lambda _: _PARALLEL_DIMS.pop(key, None)), dims)
    return dims


@torch.no_grad()
def grad_norm(model: nn.Module, norm_type: float = 2.0) -> torch.Tensor:
    """The global norm of a PaRO model's synchronized gradients, the same on every rank.

    Every gradient element lives in exactly one optimizer slice of each group (O=I) or of the
    whole mesh (O=G), so the norm is a sum over owned slices reduced over the ranks that
    partition them (and over model-parallel ranks that split the parameter); copies held by
    other groups or replicated across tensor-parallel ranks are not counted twice.
    """
    if norm_type not in (2.0, float("inf")):
        raise ValueError(f"norm_type must be 2.0 or inf, got {norm_type}")
    state = paro_state(model)
    if not state.grads_ready():
        raise RuntimeError("no synchronized gradients: compute the norm after the last micro-batch's backward")
    level = state.strategy.optim
    two = norm_type == 2.0
    device = state.groups.device
    groups: dict[tuple[str, ...], tuple[dist.ProcessGroup, ...]] = {}
    for unit in state.units:
        for region in unit.layout.regions:
            dims = _model_parallel_dims(region.param)
            groups[tuple(sorted(dims))] = tuple(dims[d] for d in sorted(dims))
    slices: defaultdict[tuple[str, ...], list[torch.Tensor]] = defaultdict(list)
    divisors: defaultdict[tuple[str, ...], list[float]] = defaultdict(list)
    for unit in state.units:
        grad, divisor = unit.summed_grad()  # not divided yet: clip_grad_norm_ scales it once
        if grad is None:
            continue
        for sl in unit.layout.slices(level):
            key = tuple(sorted(_model_parallel_dims(sl.region.param)))
            slices[key].append(grad[sl.compact_start : sl.compact_start + sl.numel])
            divisors[key].append(divisor)
    partial: dict[tuple[str, ...], torch.Tensor] = {}
    for key in groups:
        # One fused fp32 norm per slice, as torch's own clipping computes it; the slices'
        # norms are combined in fp64, so the sum over many slices and ranks loses nothing more.
        norms = torch._foreach_norm(slices[key], norm_type) if slices[key] else []
        if not norms:
            partial[key] = torch.zeros((), dtype=torch.float64, device=device)
            continue
        norms = torch.stack(torch._foreach_div(norms, divisors[key])).double()
        partial[key] = norms.square().sum() if two else norms.max()
    op = dist.ReduceOp.SUM if two else dist.ReduceOp.MAX
    dp_group = (state.groups.flat_mesh.get_group() if level is Granularity.G
                else state.groups.intra if level is Granularity.I else None)
    total = torch.zeros((), dtype=torch.float64, device=device)
    # Every rank reduces the same keys in the same order: they come from the model's parameters.
    for key in sorted(groups):
        value = partial[key]
        for group in ((dp_group,) if dp_group is not None else ()) + groups[key]:
            dist.all_reduce(value, op=op, group=group)
        total = total + value if two else torch.maximum(total, value)
    return (total.sqrt() if two else total).float()


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, norm_type: float = 2.0, *,
                    total_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Scale a PaRO model's synchronized gradients so that their global norm is at most ``max_norm``.

    Returns the norm before clipping. Pass ``total_norm`` when the norm spans more than this
    model (e.g. all pipeline stages, combined from each stage's :func:`grad_norm`).
    """
    norm = grad_norm(model, norm_type) if total_norm is None else total_norm
    coef = torch.clamp(max_norm / (norm.double() + 1e-6), max=1.0)
    for unit in paro_state(model).units:
        unit.scale_grad_(coef)  # a given total_norm may live on another device
    return norm
