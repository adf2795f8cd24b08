"""Everything the engine needs from FSDP2's internals, and nothing else.

FSDP2 owns each unit's parameters at granularity P. The engine plugs into it at four points,
all set up here: a custom all-gather (P's parameter gather), a custom reduce-scatter (the
gradient reduction to P), the all-reduce hook (where each reduced row is handed over) and a
post-accumulate-grad hook that drops FSDP's per-parameter gradients (the engine's buffers hold
them). Reading FSDP's parameter group is also only done here, so a change in FSDP2's private
layout is mended in this file.

A P=N unit lives on a one-rank mesh, where FSDP2's gather and reduction are local copies: it
copies the parameters into its all-gather buffer before compute and each gradient into its
reduce-scatter buffer and on into the reduce output. Such a unit computes in place instead
(:func:`_compute_in_place`), as DDP does: its unsharded parameters alias the stored ones, and
autograd accumulates its gradients into one flat row that is handed to the engine as it is.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter
from torch.distributed.tensor import DTensor

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
    if _param_group(module) is not None and _param_group(module).mesh_info.shard_mesh_size == 1:
        _compute_in_place(module, unit)
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
        if group.mesh_info.shard_mesh_size == 1 and _unshard_locally(group):
            return None  # nothing was gathered: FSDP2's wait_for_unshard returns at once
        return unshard(*args, **kwargs)

    group.unshard = unshard_after_sync
    to_sharded = group._to_sharded

    def to_sharded_dropping_views() -> None:
        vars(group).pop(_VIEWS_CURRENT, None)
        to_sharded()

    group._to_sharded = to_sharded_dropping_views


# Set on an FSDP2 parameter group when :func:`_unshard_locally` has made its unsharded parameters;
# dropped when the group reshards, as FSDP2 does before anything replaces the stored parameters
# (``FSDPModule._apply``, which casts and moves them, and the state-dict pre-hooks).
_VIEWS_CURRENT = "_paro_views_current"


def _unshards_locally(p: Any) -> bool:
    """Whether a one-rank unit's parameter can be unsharded by :func:`_unshard_locally`: FSDP2's
    default layout (no tensor-subclass extension, no CPU offload, no padding). Asked at every
    unshard and backward, so the answer is kept until the stored data is replaced."""
    data = p._sharded_param_data
    kept = vars(p).get("_paro_unshards_locally")
    if kept is not None and kept[0]() is data:
        return kept[1]
    if not hasattr(p, "orig_dtype"):  # FSDP2's lazy initialization has not run yet
        return False
    local = not p.offload_to_cpu and not hasattr(p._sharded_local_tensor, "fsdp_pre_all_gather") \
        and data.numel() == p.padded_sharded_param_size.numel()
    vars(p)["_paro_unshards_locally"] = (weakref.ref(data), local)
    return local


def _in_place(p: Any) -> bool:
    return _unshards_locally(p) and _compute_as_stored(p)


def _compute_as_stored(p: Any) -> bool:
    return p.param_dtype in (None, p.orig_dtype)


def grads_in_place(module: FSDPModule) -> bool:
    """Whether autograd accumulates ``module``'s gradients straight into the row the engine
    takes (one-rank mesh, parameters computed on as stored, gradients already in the reduce
    dtype): then FSDP2 is never asked to reduce them."""
    group = _param_group(module)
    return group is not None and group.mesh_info.shard_mesh_size == 1 and all(
        _in_place(p) and p.reduce_dtype in (None, p.orig_dtype) for p in group.fsdp_params)


def _unshard_locally(group: Any) -> bool:
    """A one-rank unit's unshard without FSDP2's all-gather buffer, if its parameters allow it.

    FSDP2 builds an unsharded parameter as a view of its all-gather output and, on a one-rank
    mesh, copies the stored data (cast to the compute dtype first, if it differs) into that
    output. Here, where the compute dtype is the stored one, the output *is* the stored data and
    is never freed (it is what the optimizer updates): the unsharded parameter is a view of it,
    and updates and loads reach compute with no copy. Otherwise the stored data is cast straight
    into the output, one copy instead of two. FSDP2 replacing the stored data (a cast, a load
    with ``assign=True``) reshards the group first; the next unshard notices the new data and
    makes the views again.
    """
    if group.is_unsharded and vars(group).get(_VIEWS_CURRENT):
        return True  # asked at every unshard: each module's forward, the backward, prefetches
    params = group.fsdp_params
    if not all(_unshards_locally(p) for p in params):
        return False
    as_stored = [_compute_as_stored(p) for p in params]  # with the check above: _in_place
    stale = [(p, in_place) for p, in_place in zip(params, as_stored) if _aliased(p) != in_place]
    if group.is_unsharded:
        if not stale:
            vars(group)[_VIEWS_CURRENT] = True
            return True
        group._to_sharded()
    for p, in_place in stale:
        if hasattr(p, "_unsharded_param"):
            del p._unsharded_param
        if in_place:
            p.all_gather_outputs = [p._sharded_param_data]
            p.free_unsharded_param = _keep_storage
        else:  # aliased before the stored dtype changed: back to a buffer of its own
            p.all_gather_outputs = []
            vars(p).pop("free_unsharded_param", None)
    for p, in_place in zip(params, as_stored):
        if not in_place:
            data = p._sharded_param_data
            p.init_all_gather_outputs([data.numel()], [p.param_dtype], 1, data.device)
            p.alloc_all_gather_outputs()
            with torch.autograd._unsafe_preserve_version_counter(p.all_gather_outputs[0]):
                p.all_gather_outputs[0].copy_(data)
        p.init_unsharded_param()
    group._to_unsharded()
    vars(group)[_VIEWS_CURRENT] = True
    return True


def _aliased(p: Any) -> bool:
    """Whether ``p``'s unsharded parameter is a view of its current stored data."""
    return bool(p.all_gather_outputs) and p.all_gather_outputs[0] is p._sharded_param_data


def _keep_storage() -> None:
    """``free_unsharded_param`` of an aliased parameter: its storage is the stored parameter's."""


def _compute_in_place(module: FSDPModule, unit: "Unit") -> None:
    """Give a one-rank unit's gradients to the engine without FSDP2's copies.

    Before the unit's backward, each unsharded parameter's ``.grad`` is set to its view of one
    zeroed flat row (FSDP2's row layout, padded as the engine chunks it), so autograd adds every
    micro-step's gradient into the row in place; FSDP2's reduction stays off. After the backward
    that ends the engine's window for the row (each micro-step where G is not N, else the last),
    the row is handed to :meth:`Unit.on_row` and the ``.grad`` views are dropped.
    """
    group = _param_group(module)
    fsdp_pre_backward, fsdp_post_backward = group.pre_backward, group.post_backward
    held: dict[str, Any] = {"row": None, "grads": []}

    def trainable() -> list[Any]:
        return [p for p in group.fsdp_params if p.sharded_param.requires_grad]

    def pre_backward(*args: Any, **kwargs: Any) -> Any:
        out = fsdp_pre_backward(*args, **kwargs)
        if grads_in_place(module) and group.is_unsharded:
            set_fsdp_gradient_sync(module, False)  # until the engine's next set_last_microstep
            _grads_into_row(trainable(), unit, held)
        return out

    def post_backward(*args: Any, **kwargs: Any) -> Any:
        out = fsdp_post_backward(*args, **kwargs)
        if held["row"] is not None and unit.row_due():
            row = _take_row(trainable(), held)
            unit.on_row(row, own=True)
        return out

    group.pre_backward, group.post_backward = pre_backward, post_backward


def _grads_into_row(params: list[Any], unit: "Unit", held: dict[str, Any]) -> None:
    """Point each parameter's ``.grad`` at its view of the held row (a new zeroed row if none is
    held; the held one zeroed if something replaced a view, e.g. ``zero_grad(set_to_none)``).

    A gradient autograd accumulated before the unit's backward began is written into its view:
    a module of the unit called apart from its forward (torchtitan 0.3's chunked loss calls the
    output projection, left with the root's unit, once per chunk after the forward and runs
    each chunk's backward at once)."""
    unsharded = [p._unsharded_param for p in params]
    if held["row"] is not None and all(u.grad is g for u, g in zip(unsharded, held["grads"])):
        return
    layout = unit.layout
    if held["row"] is None:
        held["row"] = unit.new_row(unsharded[0].dtype, _local(unsharded[0]).device)
    else:
        held["row"].zero_()
    grads = []
    for region, u in zip(layout.regions, unsharded):
        view = held["row"][region.offset : region.offset + region.numel].view(_local(u).shape)
        grad = view if not isinstance(u, DTensor) else \
            DTensor.from_local(view, u.device_mesh, u.placements, run_check=False, shape=u.shape, stride=u.stride())
        if u.grad is not None:
            view.copy_(_local(u.grad))
        u.grad = grad
        grads.append(grad)
    held["grads"] = grads


def _take_row(params: list[Any], held: dict[str, Any]) -> torch.Tensor:
    """The held row, with what autograd accumulated; the parameters' ``.grad`` views are dropped.
    A gradient that is not its view (autograd replaced it) is written into the row."""
    row, views = held["row"], held["grads"]
    held["row"], held["grads"] = None, []
    for p, view in zip(params, views):
        grad = p._unsharded_param.grad
        p._unsharded_param.grad = None
        if grad is None:
            _local(view).zero_()  # no gradient reached it since the view was set
        elif grad is not view:
            _local(view).copy_(_local(grad))
    return row


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


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
