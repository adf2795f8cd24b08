"""``ParoOptimizer``: a torch optimizer that steps only this rank's optimizer-state partition."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from paro_fsdp import fsdp_seam, optimizer_state
from paro_fsdp.engine import EngineState
from paro_fsdp.master_state import MasterStateDict
from paro_fsdp.optimizer_state import UnitSlices, compact_slices, ensure_inner_state
from paro_fsdp.parallelize import paro_state


class ParoOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer_class`` so that each rank updates only its O-granularity slices.

    The inner optimizer sees one tensor per (parameter, owned chunk) that is a view of the
    parameter's local storage, so it keeps moments only for the slice (K bytes per element
    over 1/m or 1/n of the parameters) and updates parameters in place; ``step`` then starts
    bringing the updated slices to every rank that holds the parameter (sync_p), which
    completes before anything reads those parameters again.

    Mixed precision as in the paper: when the model's ``mp_policy.param_dtype`` is narrower
    than its parameters and P is coarser than O, the inner optimizer steps fp32 masters of the
    slices instead, the parameters at P are stored in ``param_dtype`` from construction on, and
    sync_p moves that dtype. Where sync_p crosses groups quantized (``InterQuant.params``), the
    masters live apart too (in any compute dtype): P's copy holds the dequantized values. The model's state dict then carries the masters (gathered to P,
    so ``state_dict()`` is a collective every rank calls, as DCP does), and loading one refreshes
    them, so checkpoints stay exact across strategies.

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
        self._units: list[UnitSlices] = []
        inner_groups = [{**{k: v for k, v in grp.items() if k != "params"}, "params": []} for grp in self.param_groups]
        for unit in self._engine.units:
            if not unit.layout.regions:
                continue
            slices = unit.layout.slices(self._engine.strategy.optim)
            if unit.keeps_master_apart:  # the fp32 master moves here; the copy at P narrows below
                views = [sl.param_view().detach().clone() for sl in slices]
            else:
                views = [sl.param_view() for sl in slices]
            for sl, view in zip(slices, views):
                inner_groups[owner[id(sl.region.param)]]["params"].append(view)
            self._units.append((unit, slices, views))
        self._masters = [entry for entry in self._units if entry[0].keeps_master_apart]
        order = {id(unit): i for i, unit in enumerate(self._engine.forward_order)}
        self._sync_order = sorted(self._units, key=lambda entry: order[id(entry[0])])  # as the next forward reads
        if self._masters:
            if self._engine.compute_dtype is not None:
                fsdp_seam.cast_parameters(model, self._engine.compute_dtype)
            MasterStateDict(model, self._masters, self._engine.strategy, resync=self._sync_params)
        self.inner = optimizer_class([grp for grp in inner_groups], **defaults)
        ensure_inner_state(self.inner, self._all_views())
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
        self._engine.wait_params()  # the views are the parameters: the last update must have landed
        self._engine.release_gathered_params()
        for unit, slices, views in self._units:
            for sl, view in zip(slices, views):
                view.grad = unit.optim_grad[sl.compact_start : sl.compact_start + sl.numel]
        self._sync_hyperparameters()
        self.inner.step()
        for entry in self._sync_order:
            if entry[0].syncs_params:  # else the views updated the only copy in place
                self._sync_params(entry)
        return None

    def _sync_params(self, entry: UnitSlices) -> None:
        """Queue the unit's sync_p: its O slices (the masters where they live apart) to P's copy."""
        unit, slices, views = entry
        compact = compact_slices(unit, slices, views, self._engine.strategy.optim)
        copy_dtype = self._engine.compute_dtype if unit.keeps_master_apart else None
        unit.sync_params(compact.to(copy_dtype) if copy_dtype is not None else compact)

    def state_bytes(self) -> int:
        """Bytes of per-element optimizer state on this rank: the moments, and the fp32 masters
        where they live apart from the parameters."""
        moments = sum(v.numel() * v.element_size() for st in self.inner.state.values() for v in st.values()
                      if torch.is_tensor(v) and v.dim() > 0)
        return moments + sum(m.numel() * m.element_size() for _, _, masters in self._masters for m in masters)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for unit in self._engine.units:
            unit.zero_grad()
        for view in self._all_views():
            view.grad = None

    def _all_views(self) -> list[torch.Tensor]:
        return [v for _, _, views in self._units for v in views]

    def state_dict(self) -> dict[str, Any]:
        """Every state gathered to its parameter's sharding (collective: every rank calls it).

        Returns:
            ``torch.optim.Optimizer``'s layout; per-element states are DTensors placed like
            their parameters, so ``torch.distributed.checkpoint`` reshards them on load.
        """
        return optimizer_state.gather_state_dict(self.param_groups, self.inner, self._units, self._engine.strategy)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by :meth:`state_dict`, under any strategy and mesh.

        Raises:
            ValueError: it does not match this optimizer's param groups or parameters.
        """
        optimizer_state.load_state_dict(self.param_groups, self.inner, self._units, state_dict)
        self._sync_hyperparameters()
