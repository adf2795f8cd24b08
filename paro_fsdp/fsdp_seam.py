"""Everything the engine needs from FSDP2's internals, and nothing else.

FSDP2 owns each unit's parameters at granularity P. The engine plugs into it at four points,
all set up here: a custom all-gather (P's parameter gather), a custom reduce-scatter (the
gradient reduction to P), the all-reduce hook (where each reduced row is handed over) and a
post-accumulate-grad hook that drops FSDP's per-parameter gradients (the engine's buffers hold
them). Reading FSDP's parameter group is also only done here, so a change in FSDP2's private
layout is mended in this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter

from paro_fsdp.comm.fsdp import FSDPComm
from paro_fsdp.comm.streams import keep_for_current_stream

if TYPE_CHECKING:
    from paro_fsdp.engine import Unit


@dataclass(frozen=True)
class ShardedParam:
    """One parameter as FSDP2 holds it on this rank: its sharded DTensor and padded size."""

    param: torch.nn.Parameter
    padded_numel: int


def _param_group(module: FSDPModule):  # noqa: ANN202 - FSDP2's private FSDPParamGroup
    return module._get_fsdp_state()._fsdp_param_group


def sharded_params(module: FSDPModule) -> list[ShardedParam] | None:
    """The parameters FSDP2 manages in ``module``'s own unit, in its row order (``None``: no unit)."""
    group = _param_group(module)
    if group is None:
        return None
    return [ShardedParam(p.sharded_param, p.padded_sharded_param_size.numel()) for p in group.fsdp_params]


def fsdp_held_gradients(module: FSDPModule) -> list[torch.Tensor]:
    """Gradients FSDP2 itself keeps for ``module`` between micro-steps (its deferred, unsharded ones)."""
    group = _param_group(module)
    held = []
    for p in group.fsdp_params if group is not None else []:
        if p.unsharded_accumulated_grad is not None:
            held.append(p.unsharded_accumulated_grad)
        elif p.sharded_param.requires_grad and getattr(p, "_unsharded_param", None) is not None \
                and p._unsharded_param.grad is not None:
            held.append(p._unsharded_param.grad)
    return held


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Store the FSDP2 parameters under ``model`` in ``dtype`` (buffers keep theirs).

    FSDP2 re-pads the new sharded storage and, once its mixed-precision dtypes are derived again
    from it, gathers without a cast and still reduces in the policy's ``reduce_dtype``.
    """
    model._apply(lambda t: t.to(dtype) if isinstance(t, torch.nn.Parameter) and t.is_floating_point() else t)
    for module in model.modules():
        if isinstance(module, FSDPModule) and (group := _param_group(module)) is not None:
            group._init_mp_dtypes()


def set_fsdp_gradient_sync(module: FSDPModule, sync: bool) -> None:
    """Whether FSDP2 reduces ``module``'s gradients in the next backward (else it accumulates them)."""
    FSDPModule.set_requires_gradient_sync(module, sync, recurse=False)


def set_fsdp_reshard_after_backward(module: FSDPModule, reshard: bool) -> None:
    """Whether FSDP2 frees ``module``'s gathered parameters after the next backward."""
    FSDPModule.set_reshard_after_backward(module, reshard, recurse=False)


def reshard(module: FSDPModule) -> None:
    """Free ``module``'s gathered parameters, if FSDP2 holds them."""
    FSDPModule.reshard(module)


def attach(unit: "Unit") -> None:
    """Route ``unit``'s FSDP2 gathers, reductions and gradients through the engine."""
    module = unit.module
    module.set_custom_all_gather(_UnitAllGather(unit))  # frozen-only units are gathered (and counted) too
    _wait_params_before_unshard(module, unit)
    if not unit.layout.regions:
        return
    # Sums only: the engine divides once, by n. A factor of 1 also keeps FSDP2 from dividing its
    # reduce output in place after the hook, while the engine's reductions may still read it.
    # On a one-rank mesh (P=N) FSDP2 derives that factor of 1 itself; setting it there would make
    # FSDP2 copy the unit's gradient through an out-of-place division by 1 at every micro-step.
    module.set_force_sum_reduction_for_comms(True)
    if _param_group(module).mesh_info.shard_mesh_size > 1:
        FSDPModule.set_gradient_divide_factor(module, 1.0)
    module.set_custom_reduce_scatter(_UnitReduceScatter(unit))

    def on_reduced(reduce_output: torch.Tensor) -> None:
        # FSDP2 keeps its reduce-scatter output alive only through the sharded gradients, which
        # the engine drops: record that the engine's work on this stream still reads it.
        keep_for_current_stream(reduce_output)
        unit.on_reduced(reduce_output)

    module.set_all_reduce_hook(on_reduced)
    for region in unit.layout.regions:
        region.param.register_post_accumulate_grad_hook(_drop_grad)


def _wait_params_before_unshard(module: FSDPModule, unit: "Unit") -> None:
    """Every read of the unit's parameters by FSDP2 goes through its group's ``unshard`` (the
    pre-forward and pre-backward hooks, prefetches, ``FSDPModule.unshard``), which copies the
    sharded parameters in before its all-gather: an update still in flight lands first."""
    group = _param_group(module)
    if group is None:
        return
    unshard = group.unshard

    def unshard_after_sync(*args: Any, **kwargs: Any) -> Any:
        unit.wait_params()
        return unshard(*args, **kwargs)

    group.unshard = unshard_after_sync


def _drop_grad(param: torch.Tensor) -> None:
    param.grad = None


class _UnitAllGather(FSDPComm, AllGather):
    """FSDP2's parameter all-gather at P, run by the engine (counted, hierarchical for P=G)."""

    def __init__(self, unit: "Unit") -> None:
        self.unit = unit

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor,
                 group: dist.ProcessGroup, async_op: bool = False) -> None:
        self.unit.gather_params(output_tensor, input_tensor)
        return None


class _UnitReduceScatter(FSDPComm, ReduceScatter):
    """FSDP2's gradient reduce-scatter to P, run by the engine (byte-optimal on every backend)."""

    def __init__(self, unit: "Unit") -> None:
        self.unit = unit

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op: dist.ReduceOp | dist.ReduceOp.RedOpType, async_op: bool = False) -> None:
        if op != dist.ReduceOp.SUM:
            raise RuntimeError(f"PaRO units reduce with SUM and divide once; FSDP asked for {op}")
        self.unit.reduce_to_params(output_tensor, input_tensor)
        return None
