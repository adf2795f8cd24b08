"""Gradient-norm clipping for PaRO models inside torchtitan's training step.

torchtitan's ``train_step`` clips with ``torchtitan.distributed.utils.clip_grad_norm_`` over
``param.grad``. PaRO keeps synchronized gradients in its engine (``param.grad`` is empty), so
that norm would be zero. :func:`install` replaces the module attribute the trainer calls with
:func:`clip_grad_norm_`, which hands PaRO models to ``paro_fsdp.clip_grad_norm_`` and any other
parameters to torchtitan's function unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
import torchtitan.distributed.utils as dist_utils
from torch.distributed.device_mesh import DeviceMesh

import paro_fsdp
from torchtitan_patch.models import PARO_MODELS

_stock_clip_grad_norm_ = dist_utils.clip_grad_norm_


def _owners(parameters: list[torch.Tensor]) -> list[nn.Module]:
    """The PaRO models whose parameters these are (torchtitan passes all model parts' parameters)."""
    ids = {id(p) for p in parameters}
    return [m for m in list(PARO_MODELS.keys()) if any(id(p) in ids for p in m.parameters())]


@torch.no_grad()
def paro_clip_grad_norm_(
    models: list[nn.Module], max_norm: float, norm_type: float = 2.0, pp_mesh: DeviceMesh | None = None
) -> torch.Tensor:
    """Clip the gradients of ``models`` (this rank's pipeline stages) by their joint global norm."""
    norms = torch.stack([paro_fsdp.grad_norm(m, norm_type).double() for m in models])
    if math.isinf(norm_type):
        total, op = norms.max(), dist.ReduceOp.MAX
    else:
        total, op = norms.pow(norm_type).sum(), dist.ReduceOp.SUM
    if pp_mesh is not None:
        dist.all_reduce(total, op=op, group=pp_mesh.get_group())
    if not math.isinf(norm_type):
        total = total.pow(1.0 / norm_type)
    for model in models:
        paro_fsdp.clip_grad_norm_(model, max_norm, norm_type, total_norm=total)
    return total.float()


def clip_grad_norm_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    pp_mesh: DeviceMesh | None = None,
    ep_enabled: bool = False,
) -> torch.Tensor:
    """torchtitan's ``clip_grad_norm_`` signature; PaRO models get the PaRO-correct norm."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    models = _owners(params)
    if not models:
        return _stock_clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, foreach, pp_mesh, ep_enabled)
    norm = paro_clip_grad_norm_(models, max_norm, norm_type, pp_mesh)
    if error_if_nonfinite and not torch.isfinite(norm):
        raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite ({norm.item()})")
    return norm


def install() -> None:
    """Route the trainer's clipping through :func:`clip_grad_norm_` (idempotent)."""
    dist_utils.clip_grad_norm_ = clip_grad_norm_
