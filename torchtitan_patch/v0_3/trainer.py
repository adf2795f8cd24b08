"""``ParoTrainer``: torchtitan 0.3's ``Trainer`` with PaRO wired into the extension points it builds from.

A config function returns a ``ParoTrainer.Config`` (:mod:`torchtitan_patch.v0_3.config_registry`
has ours; a user's own can start from one of those or from ``ParoTrainer.Config(...)`` with the
fields of any torchtitan config) and ``config.build()``, which ``torchtitan.train`` calls, makes a
``ParoTrainer``. Before torchtitan's ``__init__`` builds anything it

- checks the PaRO fields against the launch (:func:`torchtitan_patch.settings.paro_settings`)
  and the settings of 0.3 that cannot carry PaRO (SPMD backend, CUDA graphs);
- replaces the model spec's ``parallelize_fn`` with PaRO's
  (:mod:`torchtitan_patch.v0_3.parallelize`) behind layout-independent initial weights
  (:mod:`torchtitan_patch.init`) and, on CPU, FSDP's sum reductions for gloo; pipeline
  parallelism reaches the same function through the spec;
- with PaRO on, builds the optimizers and the metrics from PaRO's versions of torchtitan's
  configs (same fields), and under pipeline parallelism computes a chunked loss over whole
  sequences (its ``lm_head`` backward would otherwise run inside the schedule's forward step).

With ``parallelism.paro_strategy`` unset it trains exactly as torchtitan's ``Trainer``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from torchtitan.components.loss import ChunkedLossWrapper
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.tools.logging import logger
from torchtitan.trainer import Trainer

from torchtitan_patch import checkpoint, clip, elastic
from torchtitan_patch.cpu import cpu_mode_enabled, gloo_safe
from torchtitan_patch.data import register_dataset
from torchtitan_patch.init import full_tensor_init
from torchtitan_patch.settings import paro_settings
from torchtitan_patch.v0_3.config import (
    ParoCheckpointConfig,
    ParoDebugConfig,
    ParoParallelismConfig,
    check_release_fields,
    job_view,
)
from torchtitan_patch.v0_3.metrics import ParoMetricsProcessor
from torchtitan_patch.v0_3.optimizer import ParoOptimizersContainer
from torchtitan_patch.v0_3.parallelize import paro_parallelize_fn


class ParoTrainer(Trainer):
    """torchtitan 0.3's ``Trainer``; PaRO replaces its data parallelism when ``parallelism.paro_strategy`` is set."""

    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        parallelism: ParoParallelismConfig = field(default_factory=ParoParallelismConfig)
        debug: ParoDebugConfig = field(default_factory=ParoDebugConfig)
        checkpoint: ParoCheckpointConfig = field(default_factory=ParoCheckpointConfig)

    def __init__(self, config: Config) -> None:
        if config.model_spec is None:
            raise ValueError("ParoTrainer.Config.model_spec is unset; a config function sets it from model_registry")
        job = job_view(config)
        settings = paro_settings(job, int(os.environ.get("WORLD_SIZE", "1")))
        parallelize = full_tensor_init(paro_parallelize_fn(config.model_spec.parallelize_fn, job), job)
        if cpu_mode_enabled():
            parallelize = gloo_safe(parallelize)
        config.model_spec = dataclasses.replace(config.model_spec, parallelize_fn=parallelize)
        if settings is not None:
            check_release_fields(config)
            if config.parallelism.pipeline_parallel_degree > 1 and isinstance(config.loss, ChunkedLossWrapper.Config):
                # Its lm_head backward runs inside the last stage's forward step (and inside the
                # schedule's first-step shape probe), before the schedule's backward count says
                # whether the micro-batch is the step's last.
                logger.warning("PaRO with pipeline parallelism: the last stage computes the chunked loss's "
                               f"{type(config.loss.loss_fn).__qualname__.split('.')[0]} over whole sequences "
                               "(the same values; chunking only saves logits memory)")
                config.loss = config.loss.loss_fn
            config.optimizer = ParoOptimizersContainer.Config.of(config.optimizer)
            if type(config.metrics) is MetricsProcessor.Config:
                config.metrics = ParoMetricsProcessor.Config.of(config.metrics)
            else:
                logger.warning(f"metrics={type(config.metrics).__qualname__}: PaRO's bytes and memory are not logged")
        super().__init__(config)


def install() -> None:
    """What a 0.3 run needs before its trainer is built (idempotent): data, clipping, elastic restarts,
    checkpoint checks."""
    register_dataset()
    clip.install()
    elastic.install()
    checkpoint.install(lambda args, kwargs: kwargs.get("config", args[0] if args else None))  # __init__(config, *, ...)
