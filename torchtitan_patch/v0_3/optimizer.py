"""torchtitan 0.3's optimizer container for PaRO models: one ``ParoOptimizer`` per model part.

The trainer builds its optimizer from ``config.optimizer``; :class:`ParoTrainer
<torchtitan_patch.v0_3.trainer.ParoTrainer>` puts this container's config in its place (same
fields) when PaRO wraps the model, so a config's ``param_groups`` (pattern, optimizer name and
its keyword arguments) and ``implementation`` mean what they mean to torchtitan.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn as nn
from torchtitan.components.optimizer import OptimizersContainer

from paro_fsdp import ParoOptimizer
from torchtitan_patch.optimizer import ParoOptimizers
from torchtitan_patch.settings import ParoConfigError


class ParoOptimizersContainer(ParoOptimizers, OptimizersContainer):
    """``OptimizersContainer`` whose optimizers step only this rank's optimizer-state partition."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        @classmethod
        def of(cls, config: OptimizersContainer.Config) -> ParoOptimizersContainer.Config:
            """This container's config with the fields of torchtitan's ``config``."""
            if type(config) is not OptimizersContainer.Config:
                raise ParoConfigError(
                    f"optimizer={type(config).__qualname__} is not supported with parallelism.paro_strategy; "
                    f"PaRO builds its optimizers from torchtitan's OptimizersContainer.Config"
                )
            return cls(**{f.name: getattr(config, f.name) for f in fields(config) if f.init})

    def __init__(self, config: Config, *, model_parts: list[nn.Module]) -> None:
        if config.implementation == "fused_opt_states_bf16":
            raise ParoConfigError(
                "optimizer.implementation='fused_opt_states_bf16' is not supported with parallelism.paro_strategy: "
                "PaRO keeps the moments with the fp32 master at O; valid: fused, foreach, for-loop"
            )
        impl_kwargs = self._build_impl_kwargs(config)
        self.model_parts = model_parts
        self.optimizers = []
        for model in model_parts:
            groups, _ = self._build_param_groups(model, config.param_groups, impl_kwargs)
            if len(groups) != 1:
                raise ParoConfigError(
                    f"optimizer.param_groups name {len(groups)} optimizers ({', '.join(groups)}); with "
                    f"parallelism.paro_strategy every group must use the same optimizer (param groups with their "
                    f"own keyword arguments are fine)"
                )
            ((name, param_groups),) = groups.items()
            optimizer_cls = self._resolve_optimizer_factory(name)
            if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
                raise ParoConfigError(
                    f"optimizer.param_groups optimizer_name={name!r} is not supported with parallelism.paro_strategy: "
                    f"PaRO wraps a torch.optim.Optimizer class (Adam, AdamW)"
                )
            kwargs: dict[str, Any] = config.optimizer_factory_kwargs_by_name.get(name, {})
            self.optimizers.append(ParoOptimizer(model, optimizer_cls, param_groups=param_groups, **kwargs))
        self._post_init([p for opt in self.optimizers for group in opt.param_groups for p in group["params"]])
