"""``ParoOptimizer``: a torch optimizer that steps only this rank's optimizer-state partition."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from paro_fsdp.comm.device import all_gather_object
from paro_fsdp.engine import EngineState, Unit
from paro_fsdp.layout import Slice
from paro_fsdp.parallelize import paro_state


class ParoOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer_class`` so that each rank updates only its O-granularity slices.

    The inner optimizer sees one tensor per (parameter, owned chunk) that is a view of the
    parameter's local storage, so it keeps moments only for the slice (K bytes per element
    over 1/m or 1/n of the parameters) and updates parameters in place; ``step`` then brings
    the updated slices to every rank that holds the parameter (sync_p).

    ``param_groups`` follow the outer, model-level parameters, so LR schedulers and
    ``torch.distributed.checkpoint.state_dict`` work as for any optimizer. ``state_dict``
    gathers each state to the parameters' own sharding, so checkpoints reshard across
    strategies and group layouts.
    """

    def __init__(self, model: nn.Module, optimizer_class: type[torch.optim.Optimizer],
                 param_groups: Iterable[dict[str, Any]] | None = None, **defaults: Any) -> None:
        self._engine: EngineState = paro_state(model)
        if self._engine.optimizer is not None:
            raise ValueError("this model already has a ParoOptimizer; build one optimizer per model")
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
            raise TypeError(f"optimizer_class must be a torch.optim.Optimizer subclass, got {optimizer_class!r}")
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups = list(param_groups) if param_groups is not None else [{"params": trainable}]
        super().__init__(groups, defaults)
        owner = {id(p): i for i, grp in enumerate(self.param_groups) for p in grp["params"]}
        for p in trainable:
            if id(p) not in owner:
                raise ValueError("every trainable parameter must be in one of param_groups")
        # (unit, O-level slices, the inner optimizer's view of each slice), in a fixed order:
        # every rank iterates units identically.
        self._units: list[tuple[Unit, list[Slice], list[torch.Tensor]]] = []
        inner_groups = [{**{k: v for k, v in grp.items() if k != "params"}, "params": []} for grp in self.param_groups]
        for unit in self._engine.units:
            if not unit.layout.regions:
                continue
            slices = unit.layout.slices(self._engine.strategy.optim)
            views = [sl.param_view() for sl in slices]
            for sl, view in zip(slices, views):
                inner_groups[owner[id(sl.region.param)]]["params"].append(view)
            self._units.append((unit, slices, views))
        self.inner = optimizer_class([grp for grp in inner_groups], **defaults)
        self._ensure_inner_state()
        # ``state`` names each parameter's state entries (what torch.distributed.checkpoint
        # reads to unflatten a state dict); the values live in ``inner``, sliced, and
        # ``state_dict()`` returns them whole.
        names = dict.fromkeys(k for st in self.inner.state.values() for k in st)
        for p in trainable:
            self.state[p] = dict(names)
        self._engine.optimizer = self

    def _sync_hyperparameters(self) -> None:
        for outer, inner in zip(self.param_groups, self.inner.param_groups):
            inner.update({k: v for k, v in outer.items() if k != "params"})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Update this rank's slices from the synchronized gradients, then sync_p."""
        if closure is not None:
            raise ValueError("ParoOptimizer.step does not take a closure: run forward and backward before step()")
        if not self._engine.grads_ready():
            raise RuntimeError(
                "no synchronized gradients to step on: run backward with model.set_requires_gradient_sync(True) "
                "on the last micro-batch (the default) before optimizer.step()"
            )
        for unit, slices, views in self._units:
            for sl, view in zip(slices, views):
                view.grad = unit.optim_grad[sl.compact_start : sl.compact_start + sl.numel]
        self._sync_hyperparameters()
        self.inner.step()
        for unit, slices, views in self._units:
            unit.sync_params(self._compact(unit, slices, views))
        return None

    def _compact(self, unit: Unit, slices: list[Slice], values: list[torch.Tensor]) -> torch.Tensor:
        """Pack per-slice tensors into the unit's O-level compact buffer (gaps are zeros)."""
        level = self._engine.strategy.optim
        ref = values[0] if values else unit.layout.regions[0].param
        out = torch.zeros(unit.layout.compact_numel(level), dtype=ref.dtype, device=ref.device)
        for sl, v in zip(slices, values):
            out[sl.compact_start : sl.compact_start + sl.numel].copy_(v)
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        for unit in self._engine.units:
            unit.zero_grad()
        for view in self._all_views():
            view.grad = None

    def _all_views(self) -> list[torch.Tensor]:
        return [v for _, _, views in self._units for v in views]

    # Checkpointing: states are exchanged at the parameters' sharding (a DTensor like the parameter).

    def _ensure_inner_state(self) -> None:
        """Create the inner optimizer's state (zeros) the way a first step would, without changing parameters."""
        if self.inner.state or not self._all_views():
            return
        for view in self._all_views():
            view.grad = torch.zeros_like(view)
        self._sync_hyperparameters()
        saved = [grp["lr"] for grp in self.inner.param_groups]
        for grp in self.inner.param_groups:
            grp["lr"] = 0.0
        self.inner.step()
        for grp, lr in zip(self.inner.param_groups, saved):
            grp["lr"] = lr
        for st in self.inner.state.values():
            if "step" in st and torch.is_tensor(st["step"]):
                st["step"].zero_()
            elif "step" in st:
                st["step"] = 0
        for view in self._all_views():
            view.grad = None

    def _state_keys(self) -> tuple[list[str], list[str]]:
        """(per-element keys, scalar keys) of the inner state, agreed on by all ranks."""
        mine: dict[str, bool] = {}
        for st in self.inner.state.values():
            for k, v in st.items():
                mine[k] = torch.is_tensor(v) and v.dim() > 0
        everyone: list[dict[str, bool]] = all_gather_object(mine)  # on the default group's device (NCCL: this GPU)
        merged = {k: v for d in everyone for k, v in d.items()}
        return sorted(k for k, v in merged.items() if v), sorted(k for k, v in merged.items() if not v)

    def state_dict(self) -> dict[str, Any]:
        tensor_keys, scalar_keys = self._state_keys()
        index = {id(p): i for i, p in enumerate(p for grp in self.param_groups for p in grp["params"])}
        scalars = next(iter(self.inner.state.values()), {})
        state: dict[int, dict[str, Any]] = {}
        level = self._engine.strategy.optim
        for unit, slices, views in self._units:
            for key in tensor_keys:
                values = [self.inner.state[view][key] for view in views]
                compact = self._compact(unit, slices, values)
                row = unit.gather(compact, level, self._engine.strategy.param)
                for region in unit.layout.regions:
                    local = row[region.offset : region.offset + region.numel].view(_local(region.param).shape)
                    entry = state.setdefault(index[id(region.param)], {})
                    entry[key] = _like_param(local.clone(), region.param)
            for region in unit.layout.regions:
                entry = state.setdefault(index[id(region.param)], {})
                for key in scalar_keys:
                    value = scalars.get(key)
                    entry[key] = value.clone() if torch.is_tensor(value) else value
        groups = []
        for grp in self.param_groups:
            groups.append({**{k: v for k, v in grp.items() if k != "params"},
                           "params": [index[id(p)] for p in grp["params"]]})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)
        ):
            raise ValueError(
                "optimizer state does not match this optimizer's param groups (saved sizes "
                f"{[len(s['params']) for s in saved_groups]}, current {[len(g['params']) for g in self.param_groups]})"
            )
        by_param = {}
        for grp, saved in zip(self.param_groups, saved_groups):
            grp.update({k: v for k, v in saved.items() if k != "params"})
            for p, key in zip(grp["params"], saved["params"]):
                if key in state_dict["state"]:
                    by_param[id(p)] = state_dict["state"][key]
        for _, slices, views in self._units:
            for sl, view in zip(slices, views):
                saved = by_param.get(id(sl.region.param))
                if saved is None:
                    raise ValueError("optimizer state is missing a trainable parameter; was it saved from this model?")
                inner = self.inner.state[view]
                for key, value in saved.items():
                    if torch.is_tensor(value) and value.dim() > 0:
                        flat = _local(value).reshape(-1)
                        inner[key].copy_(flat[sl.param_start : sl.param_start + sl.numel])
                    elif torch.is_tensor(value) and torch.is_tensor(inner.get(key)):
                        inner[key].copy_(_local(value))
                    else:
                        inner[key] = value
        self._sync_hyperparameters()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def _like_param(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    if isinstance(param, DTensor):
        return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                  shape=param.size(), stride=param.stride())
    return local
