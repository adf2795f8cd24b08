"""What torchtitan's optimizer container does differently for PaRO models, on any release.

Each adapter's container (``ParoOptimizersContainer``) builds one
:class:`paro_fsdp.ParoOptimizer` per model part from its release's optimizer config and mixes
this in before the release's ``OptimizersContainer``.
"""

from __future__ import annotations

import functools
from typing import Any

from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from torchtitan_patch.models import PARO_MODELS

_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


class ParoOptimizers:
    """Mixin for an ``OptimizersContainer`` of ``ParoOptimizer``s (``model_parts`` / ``optimizers`` alike).

    - ``zero_grad`` starts an optimizer step, so the gradient-sync drivers restart their count.
    - State dicts go through ``torch.distributed.checkpoint.state_dict``, flattened by parameter
      name: each state at its parameter's sharding, so DCP reshards it across strategies and
      group layouts, and a checkpoint holds the same keys whichever torchtitan release wrote it.
    """

    def zero_grad(self, *args: Any, **kwargs: Any) -> None:
        for model in self.model_parts:
            PARO_MODELS[model].reset()
        super().zero_grad(*args, **kwargs)  # type: ignore[misc]

    def state_dict(self) -> dict[str, Any]:
        func = functools.partial(get_optimizer_state_dict, options=_FLAT)
        return {k: v for sd in map(func, self.model_parts, self.optimizers) for k, v in sd.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for model, optimizer in zip(self.model_parts, self.optimizers, strict=True):
            set_optimizer_state_dict(model, optimizer, optim_state_dict=state_dict, options=_FLAT)
