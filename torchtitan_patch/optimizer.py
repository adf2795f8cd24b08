"""What torchtitan's optimizer container does differently for PaRO models, on any release.

Each adapter's container (``ParoOptimizersContainer``) builds one
:class:`paro_fsdp.ParoOptimizer` per model part from its release's optimizer config and mixes
this in before the release's ``OptimizersContainer``.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from paro_fsdp.feedback_state import (
    PREFIX,
    feedback_state_dict,
    feedback_template,
    layout_key,
    load_feedback_state_dict,
)
from paro_fsdp.parallelize import paro_state
from torchtitan_patch.models import PARO_MODELS

logger = logging.getLogger(__name__)

_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


class ParoOptimizers:
    """Mixin for an ``OptimizersContainer`` of ``ParoOptimizer``s (``model_parts`` / ``optimizers`` alike).

    - ``zero_grad`` starts an optimizer step, so the gradient-sync drivers restart their count.
    - State dicts go through ``torch.distributed.checkpoint.state_dict``, flattened by parameter
      name: each state at its parameter's sharding, so DCP reshards it across strategies and
      group layouts, and a checkpoint holds the same keys whichever torchtitan release wrote it.
    - Error-feedback residuals (``paro_quant_error_feedback``) travel with them, each rank's
      under its own keys (:mod:`paro_fsdp.feedback_state`, ``paro_feedback.part<j>`` for model
      part j). Before a load, :func:`torchtitan_patch.checkpoint` hands the checkpoint's saved
      residual sizes to :attr:`feedback_saved`, so the state dict DCP loads into has them.
    """

    feedback_saved: dict[str, tuple[int, ...]] | None = None
    """The checkpoint's residual keys and sizes while a load is under way, else ``None``."""

    def zero_grad(self, *args: Any, **kwargs: Any) -> None:
        for model in self.model_parts:
            PARO_MODELS[model].reset()
        super().zero_grad(*args, **kwargs)  # type: ignore[misc]

    def state_dict(self) -> dict[str, Any]:
        func = functools.partial(get_optimizer_state_dict, options=_FLAT)
        out = {k: v for sd in map(func, self.model_parts, self.optimizers) for k, v in sd.items()}
        for j, model in enumerate(self.model_parts):
            prefix = f"{PREFIX}.part{j}"
            if self.feedback_saved is None:
                out.update(feedback_state_dict(model, prefix))
            else:
                out.update(feedback_template(model, self.feedback_saved, prefix))
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        residuals = {k: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(f"{PREFIX}.")]}
        for model, optimizer in zip(self.model_parts, self.optimizers, strict=True):
            set_optimizer_state_dict(model, optimizer, optim_state_dict=state_dict, options=_FLAT)
        for j, model in enumerate(self.model_parts):
            if layout_key(paro_state(model)) is not None and not load_feedback_state_dict(model, residuals,
                                                                                       f"{PREFIX}.part{j}"):
                logger.warning("the checkpoint holds no error-feedback residuals for this run's layout (%s): they "
                               "start at zero, as in a fresh run", layout_key(paro_state(model)))
