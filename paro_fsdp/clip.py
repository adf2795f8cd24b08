"""Gradient clipping by the true global norm, whatever the partition."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from paro_fsdp.parallelize import paro_state
from paro_fsdp.strategy import Granularity


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Clip the synchronized gradients of a PaRO model; returns the total norm before clipping.

    Every gradient element lives in exactly one optimizer slice of each group (O=I) or of the
    whole mesh (O=G), so the norm is a sum over owned slices reduced over the ranks that
    partition them; copies held by other groups are not counted twice.
    """
    if norm_type not in (2.0, float("inf")):
        raise ValueError(f"norm_type must be 2.0 or inf, got {norm_type}")
    state = paro_state(model)
    if not state.grads_ready():
        raise RuntimeError("no synchronized gradients to clip: call clip_grad_norm_ after the last micro-batch's backward")
    grads = [u.optim_grad for u in state.units if u.optim_grad is not None]
    device = state.groups.device
    if norm_type == 2.0:
        total = sum((g.double().square().sum() for g in grads), torch.zeros((), dtype=torch.float64, device=device))
        op = dist.ReduceOp.SUM
    else:
        total = max((g.abs().max().double() for g in grads), default=torch.zeros((), dtype=torch.float64, device=device))
        op = dist.ReduceOp.MAX
    level = state.strategy.optim
    if level is Granularity.G:
        dist.all_reduce(total, op=op, group=state.groups.flat_mesh.get_group())
    elif level is Granularity.I:
        dist.all_reduce(total, op=op, group=state.groups.intra)
    norm = total.sqrt() if norm_type == 2.0 else total
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return norm.float()
