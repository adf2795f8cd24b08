"""``ParoOptimizer``'s state at the parameters' sharding: checkpoint save and load.

The inner optimizer keeps each state only for this rank's O-granularity slices. A checkpoint
exchanges it the way the parameters are sharded (P granularity, a DTensor placed like the
parameter), so ``torch.distributed.checkpoint`` saves it and reshards it across strategies
and group layouts; loading takes each rank's slices back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from paro_fsdp.comm.device import all_gather_object
from paro_fsdp.engine import Unit
from paro_fsdp.layout import Slice
from paro_fsdp.strategy import Granularity, ParoStrategy

UnitSlices = tuple[Unit, list[Slice], list[torch.Tensor]]
"""A unit, this rank's O-level slices of it, and the inner optimizer's view of each slice."""


def compact_slices(unit: Unit, slices: Sequence[Slice], values: Sequence[torch.Tensor],
                   level: Granularity) -> torch.Tensor:
    """Pack per-slice tensors into the unit's compact buffer at ``level`` (gaps are zeros).

    Args:
        unit: the unit the slices belong to.
        slices: this rank's slices of the unit at ``level``.
        values: one tensor per slice, of the slice's size (parameters or a state).
        level: the optimizer's granularity O, at which the slices were cut.

    Returns:
        A 1D tensor of ``unit.layout.compact_numel(level)`` elements, what ``Unit.sync_params``
        and ``Unit.gather`` take.
    """
    ref = values[0] if values else unit.layout.regions[0].param
    out = torch.zeros(unit.layout.compact_numel(level), dtype=ref.dtype, device=ref.device)
    for sl, v in zip(slices, values):
        out[sl.compact_start : sl.compact_start + sl.numel].copy_(v)
    return out


def ensure_inner_state(inner: torch.optim.Optimizer, views: Sequence[torch.Tensor]) -> None:
    """Create ``inner``'s state (zeros) the way a first step would, without changing parameters.

    The state's entries must exist before the first step: they name what a checkpoint holds
    and receive what one loads.
    """
    if inner.state or not views:
        return
    for view in views:
        view.grad = torch.zeros_like(view)
    saved = [grp["lr"] for grp in inner.param_groups]
    for grp in inner.param_groups:
        grp["lr"] = 0.0
    inner.step()
    for grp, lr in zip(inner.param_groups, saved):
        grp["lr"] = lr
    for st in inner.state.values():
        if "step" in st and torch.is_tensor(st["step"]):
            st["step"].zero_()
        elif "step" in st:
            st["step"] = 0
    for view in views:
        view.grad = None


def _state_keys(inner: torch.optim.Optimizer) -> tuple[list[str], list[str]]:
    """(per-element keys, scalar keys) of the inner state, agreed on by all ranks.

    A rank that owns no slice has no state, and must still take part in every gather.
    """
    mine: dict[str, bool] = {}
    for st in inner.state.values():
        for k, v in st.items():
            mine[k] = torch.is_tensor(v) and v.dim() > 0
    everyone: list[dict[str, bool]] = all_gather_object(mine)  # on the default group's device (NCCL: this GPU)
    merged = {k: v for d in everyone for k, v in d.items()}
    return sorted(k for k, v in merged.items() if v), sorted(k for k, v in merged.items() if not v)


def gather_state_dict(param_groups: list[dict[str, Any]], inner: torch.optim.Optimizer,
                      units: Sequence[UnitSlices], strategy: ParoStrategy) -> dict[str, Any]:
    """The optimizer's state dict, each per-element state gathered to its parameter's sharding.

    Collective: every rank of the mesh calls it.

    Args:
        param_groups: the outer optimizer's groups of model parameters.
        inner: the optimizer that steps this rank's slices.
        units: every unit with trainable parameters, in the same order on all ranks.
        strategy: the strategy that runs (O and P granularities).

    Returns:
        ``{"state": {index: {key: value}}, "param_groups": [...]}`` as ``torch.optim.Optimizer``
        lays it out, indices in ``param_groups`` order; per-element states are placed like the
        parameter (a DTensor for a DTensor parameter), scalar states (``step``) as they are.
    """
    tensor_keys, scalar_keys = _state_keys(inner)
    index = {id(p): i for i, p in enumerate(p for grp in param_groups for p in grp["params"])}
    scalars = next(iter(inner.state.values()), {})
    state: dict[int, dict[str, Any]] = {}
    for unit, slices, views in units:
        for key in tensor_keys:
            values = [inner.state[view][key] for view in views]
            for param, value in gather_to_params(unit, slices, values, strategy):
                state.setdefault(index[id(param)], {})[key] = value
        for region in unit.layout.regions:
            entry = state.setdefault(index[id(region.param)], {})
            for key in scalar_keys:
                value = scalars.get(key)
                entry[key] = value.clone() if torch.is_tensor(value) else value
    groups = []
    for grp in param_groups:
        groups.append({**{k: v for k, v in grp.items() if k != "params"},
                       "params": [index[id(p)] for p in grp["params"]]})
    return {"state": state, "param_groups": groups}


def load_state_dict(param_groups: list[dict[str, Any]], inner: torch.optim.Optimizer,
                    units: Sequence[UnitSlices], state_dict: dict[str, Any]) -> None:
    """Take this rank's slices of a state dict laid out as :func:`gather_state_dict` returns it.

    The saved states may come from another strategy or mesh: only the parameters' shapes (as
    seen by this rank) must match. Hyperparameters are loaded into ``param_groups``; the
    caller passes them on to ``inner``.

    Args:
        param_groups: the outer optimizer's groups of model parameters; updated in place.
        inner: the optimizer that steps this rank's slices; its state is overwritten.
        units: every unit with trainable parameters.
        state_dict: the saved state dict.

    Raises:
        ValueError: the saved param groups differ in number or size from ``param_groups``, or
            a trainable parameter has no saved state.
    """
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups) or any(
        len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, param_groups)
    ):
        raise ValueError(
            "optimizer state does not match this optimizer's param groups (saved sizes "
            f"{[len(s['params']) for s in saved_groups]}, current {[len(g['params']) for g in param_groups]})"
        )
    by_param = {}
    for grp, saved in zip(param_groups, saved_groups):
        grp.update({k: v for k, v in saved.items() if k != "params"})
        for p, key in zip(grp["params"], saved["params"]):
            if key in state_dict["state"]:
                by_param[id(p)] = state_dict["state"][key]
    for _, slices, views in units:
        for sl, view in zip(slices, views):
            saved = by_param.get(id(sl.region.param))
            if saved is None:
                raise ValueError("optimizer state is missing a trainable parameter; was it saved from this model?")
            state = inner.state[view]
            for key, value in saved.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    state[key].copy_(slice_of(value, sl))
                elif torch.is_tensor(value) and torch.is_tensor(state.get(key)):
                    state[key].copy_(_local(value))
                else:
                    state[key] = value


def gather_to_params(unit: Unit, slices: Sequence[Slice], values: Sequence[torch.Tensor],
                     strategy: ParoStrategy) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """Per-slice values at O, gathered to the sharding of each of the unit's parameters.

    Collective: every rank of the mesh calls it for the same unit.

    Returns:
        ``(parameter, value)`` for each trainable parameter of the unit; the value is placed
        like the parameter (a DTensor for a DTensor parameter), in the values' dtype.
    """
    row = unit.gather(compact_slices(unit, slices, values, strategy.optim), strategy.optim, strategy.param)
    out = []
    for region in unit.layout.regions:
        local = row[region.offset : region.offset + region.numel].view(_local(region.param).shape)
        out.append((region.param, _like_param(local.clone(), region.param)))
    return out


def placed_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` placed as ``param`` is, so that its local tensor is this rank's shard.

    A state dict may hold a parameter placed otherwise: a module's load hook can rebuild it
    (torchtitan 0.3's fused QKV merges the saved ``wq`` / ``wk`` / ``wv`` into a replicated
    ``wqkv``), or a full tensor may come from a consolidated checkpoint. Redistributing is a
    collective over the parameter's mesh, which every rank's load reaches alike.
    """
    if not isinstance(param, DTensor):
        return value.full_tensor() if isinstance(value, DTensor) else value
    if isinstance(value, DTensor):
        if value.device_mesh == param.device_mesh and tuple(value.placements) == tuple(param.placements):
            return value
        return value.redistribute(param.device_mesh, param.placements)
    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def slice_of(value: torch.Tensor, sl: Slice) -> torch.Tensor:
    """The part of a value placed like ``sl``'s parameter that falls into slice ``sl``."""
    return _local(value).reshape(-1)[sl.param_start : sl.param_start + sl.numel]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def _like_param(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    if isinstance(param, DTensor):
        return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                  shape=param.size(), stride=param.stride())
    return local
