"""torchtitan 0.2.2's optimizer container for PaRO models: one ``ParoOptimizer`` per model part."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torchtitan.components.optimizer import OptimizersContainer, build_optimizers
from torchtitan.config import Optimizer as OptimizerConfig
from torchtitan.distributed import ParallelDims

from paro_fsdp import ParoOptimizer
from torchtitan_patch.models import paro_models
from torchtitan_patch.optimizer import ParoOptimizers

_OPTIMIZERS = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}  # torchtitan's choices


class ParoOptimizersContainer(ParoOptimizers, OptimizersContainer):
    """``OptimizersContainer`` whose optimizers step only this rank's optimizer-state partition."""

    def __init__(self, model_parts: list[nn.Module], optimizer_cls: type, optimizer_kwargs: dict[str, Any]) -> None:
        self.model_parts = model_parts
        self.optimizers = [ParoOptimizer(model, optimizer_cls, **optimizer_kwargs) for model in model_parts]
        self._validate_length(len(model_parts))
        params = [p for opt in self.optimizers for group in opt.param_groups for p in group["params"]]
        self._post_init(params, optimizer_kwargs)


def build_paro_optimizers(
    model_parts: list[nn.Module], optimizer_config: OptimizerConfig, parallel_dims: ParallelDims, ft_manager: Any = None
) -> OptimizersContainer:
    """A train spec ``build_optimizers_fn``: PaRO's container for PaRO models, torchtitan's otherwise."""
    if not paro_models(model_parts):
        return build_optimizers(model_parts, optimizer_config, parallel_dims, ft_manager)
    if optimizer_config.name not in _OPTIMIZERS:
        raise ValueError(f"optimizer.name={optimizer_config.name!r} is not supported; valid: {', '.join(_OPTIMIZERS)}")
    kwargs = {  # the keyword arguments torchtitan's build_optimizers passes
        "lr": optimizer_config.lr,
        "betas": (optimizer_config.beta1, optimizer_config.beta2),
        "eps": optimizer_config.eps,
        "weight_decay": optimizer_config.weight_decay,
        "fused": optimizer_config.implementation == "fused",
        "foreach": optimizer_config.implementation == "foreach",
    }
    return ParoOptimizersContainer(model_parts, _OPTIMIZERS[optimizer_config.name], kwargs)
