"""The fp32 masters in the model's state dict, under each parameter's own key.

Where P is coarser than O and the compute dtype is narrower (``Unit.keeps_master_apart``), a
parameter at P is a compute-dtype copy and its fp32 master lives at O beside the moments. A
checkpoint must hold the master, so the model's state dict carries it in place of the copy,
and loading one refreshes it: checkpoints stay exact and load under any strategy.

The substitution runs in hooks on the module that owns each parameter, not on the root. The
wrappers torchtitan puts between a model and its parameters then treat the master's key
exactly as they treat the parameter's own: activation checkpointing's ``CheckpointWrapper``
strips its ``_checkpoint_wrapped_module`` segment from its children's keys in its own hooks
(and adds it back before a load), ``torch.compile``'s ``OptimizedModule`` keeps ``_orig_mod``
for ``torch.distributed.checkpoint`` to strip, float8 and other module swaps own their
parameters under the same names, and each pipeline stage's model part has its own hooks. A key
built from the root's ``named_parameters()`` would carry those segments where
``get_model_state_dict`` expects the clean FQN.

After a load, P's copy is what sync_p makes of the loaded masters, as after a step: the unit's
load post-hook runs its sync_p (a collective, in module order on every rank). Where sync_p is
quantized the copy is then the dequantized masters, bit for bit what the saving run computed
on, so a resume is exact; elsewhere it equals the loaded value.

Gathering a unit's masters to P is a collective. A state-dict pre-hook on the unit's module
gathers them once per ``state_dict()`` call, in module order on every rank; the owners' hooks
read them and the unit's post-hook drops them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from paro_fsdp.layout import Slice
from paro_fsdp.optimizer_state import UnitSlices, gather_to_params, placed_like, slice_of
from paro_fsdp.strategy import ParoStrategy

# (name in its owning module, the parameter, its unit's entry)
_Owned = list[tuple[str, nn.Parameter, UnitSlices]]


class MasterStateDict:
    """Puts the masters of ``masters``' units into ``model``'s state dict and loads them back.

    Args:
        model: the model (or pipeline model part) whose units are in ``masters``.
        masters: the units that keep their fp32 master apart, with this rank's O-level slices
            and the master of each slice.
        strategy: the strategy that runs (the P and O granularities the gather moves between).
        resync: queues a unit's sync_p from its masters (``ParoOptimizer``'s own), run after
            every load of the unit.
    """

    def __init__(self, model: nn.Module, masters: Sequence[UnitSlices], strategy: ParoStrategy,
                 resync: Callable[[UnitSlices], None]) -> None:
        self._strategy = strategy
        self._resync = resync
        self._gathered: dict[int, dict[int, torch.Tensor]] = {}  # id(unit) -> {id(param): master at P}
        entry_of = {id(region.param): entry for entry in masters for region in entry[0].layout.regions}
        self._slices: dict[int, list[tuple[Slice, torch.Tensor]]] = {}
        for _, slices, values in masters:
            for sl, master in zip(slices, values):
                self._slices.setdefault(id(sl.region.param), []).append((sl, master))
        # Owners' hooks first: where a unit's module owns parameters itself, its post-hook that
        # drops the gathered masters must run after the one that reads them.
        for module in model.modules():
            owned = [(name, p, entry_of[id(p)]) for name, p in module.named_parameters(recurse=False)
                     if id(p) in entry_of]
            if owned:
                module.register_state_dict_post_hook(functools.partial(self._into_state_dict, owned))
                module.register_load_state_dict_pre_hook(functools.partial(self._from_state_dict, owned))
        # A unit of several modules (P = N blocks sharing a bucket) gathers for each module's
        # state dict and re-syncs after each module's load: a module's state dict or load may be
        # taken alone.
        for entry in masters:
            for module in entry[0].modules:
                module.register_state_dict_pre_hook(functools.partial(self._gather_unit, entry))
                module.register_state_dict_post_hook(functools.partial(self._drop_unit, id(entry[0])))
                module.register_load_state_dict_post_hook(functools.partial(self._sync_loaded, entry))

    def _gather(self, entry: UnitSlices) -> dict[int, torch.Tensor]:
        unit, slices, values = entry
        return {id(param): value for param, value in gather_to_params(unit, slices, values, self._strategy)}

    def _gather_unit(self, entry: UnitSlices, *_: Any) -> None:
        self._gathered[id(entry[0])] = self._gather(entry)

    def _drop_unit(self, key: int, *_: Any) -> None:
        self._gathered.pop(key, None)

    def _sync_loaded(self, entry: UnitSlices, *_: Any) -> None:
        self._resync(entry)
        entry[0].wait_params()

    def _into_state_dict(self, owned: _Owned, module: nn.Module, state_dict: dict[str, Any],
                         prefix: str, local_metadata: Any) -> None:
        alone: dict[int, dict[int, torch.Tensor]] = {}
        for name, param, entry in owned:
            key = id(entry[0])
            gathered = self._gathered.get(key, alone.get(key))
            if gathered is None:  # state_dict() of a module inside the unit: gather for it alone
                gathered = alone[key] = self._gather(entry)
            state_dict[prefix + name] = gathered[id(param)]

    def _from_state_dict(self, owned: _Owned, module: nn.Module, state_dict: dict[str, Any],
                         prefix: str, *_: Any) -> None:
        for name, param, _ in owned:
            value = state_dict.get(prefix + name)
            if value is not None:
                value = placed_like(value, param)
                for sl, master in self._slices.get(id(param), ()):
                    master.copy_(slice_of(value, sl))
