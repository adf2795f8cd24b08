"""Which models this process wrapped with PaRO, and how their gradient sync is driven.

The parallelize hook registers every model it wraps (:func:`register_paro_model`); the
optimizer builder, the gradient clipping and the metrics look them up here. torchtitan never
tells a model which backward ends the optimizer step, so each registered model gets a
:class:`GradientSyncDriver` that counts backwards and marks the last one.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn as nn
from torchtitan.distributed import ParallelDims

PARO_MODELS: "weakref.WeakKeyDictionary[nn.Module, GradientSyncDriver]" = weakref.WeakKeyDictionary()


class GradientSyncDriver:
    """Drives ``set_requires_gradient_sync`` from torchtitan's gradient-accumulation loop.

    torchtitan runs several backward passes per optimizer step (``gradient_accumulation_steps``
    micro-batches, each split into pipeline micro-batches under PP) and never tells the model
    which one is last. The driver counts them since the last ``zero_grad`` and marks every
    ``backwards_per_step``-th as last, so cross-group gradient traffic happens once per step.

    Without PP a forward pre-hook counts training forwards (validation, in eval mode or without
    grad, is not counted). Under PP the schedule calls ``set_requires_gradient_sync(False)``
    before each of its backwards and ``True`` after the last one; the driver takes over that
    method on the model, so the last backward itself runs synchronized (PaRO reduces across
    groups as that backward's gradients arrive) and the schedule's later ``True`` is a no-op.

    Args:
        model: a model wrapped by :func:`paro_fsdp.paro_parallelize`.
        backwards_per_step: backward passes per optimizer step (:func:`backwards_per_step`).
        pipeline: whether a pipeline schedule runs the model's backwards.
    """

    def __init__(self, model: nn.Module, backwards_per_step: int, pipeline: bool) -> None:
        self.backwards_per_step = backwards_per_step
        self.micro_batch = 0
        # The model's own method, reached through a weak reference: PARO_MODELS holds drivers
        # strongly, and a driver that held its model would keep every model ever wrapped alive.
        self._model = weakref.ref(model)
        self._set_sync_of = type(model).set_requires_gradient_sync
        if pipeline:
            model.set_requires_gradient_sync = self._from_schedule
        else:
            model.register_forward_pre_hook(self._before_forward)

    def _count(self) -> None:
        self.micro_batch += 1
        model = self._model()
        if model is not None:
            self._set_sync_of(model, self.micro_batch % self.backwards_per_step == 0)

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        if module.training and torch.is_grad_enabled():
            self._count()

    def _from_schedule(self, requires_gradient_sync: bool, *, recurse: bool = True) -> None:
        if not requires_gradient_sync:  # the schedule is about to run a backward
            self._count()

    def reset(self) -> None:
        """Start counting a new optimizer step (the optimizer container calls it in ``zero_grad``)."""
        self.micro_batch = 0


def gradient_accumulation_steps(job_config: Any, parallel_dims: ParallelDims) -> int:
    """The trainer's micro-batches per step (the formula of ``torchtitan.train.Trainer``)."""
    batch_degree = parallel_dims.dp_replicate * parallel_dims.dp_shard
    local = job_config.training.local_batch_size
    global_batch = job_config.training.global_batch_size
    return 1 if global_batch < 0 else max(1, global_batch // (local * batch_degree))


def backwards_per_step(job_config: Any, parallel_dims: ParallelDims) -> int:
    """Backward passes of a model part per optimizer step: micro-batches, times pipeline micro-batches."""
    backwards = gradient_accumulation_steps(job_config, parallel_dims)
    if parallel_dims.pp_enabled:
        backwards *= job_config.training.local_batch_size // job_config.parallelism.pipeline_parallel_microbatch_size
    return backwards


def register_paro_model(model: nn.Module, job_config: Any, parallel_dims: ParallelDims) -> GradientSyncDriver:
    """Record ``model`` as a PaRO model and attach the driver of its gradient sync.

    Args:
        model: a model part just wrapped by :func:`paro_fsdp.paro_parallelize`.
        job_config: torchtitan's job config (batch sizes, pipeline micro-batch size).
        parallel_dims: the trainer's parallel dimensions.

    Returns:
        The model's driver, also reachable as ``PARO_MODELS[model]``.
    """
    driver = GradientSyncDriver(model, backwards_per_step(job_config, parallel_dims), pipeline=parallel_dims.pp_enabled)
    PARO_MODELS[model] = driver
    return driver


def paro_models(model_parts: list[nn.Module]) -> list[nn.Module]:
    """The parts of ``model_parts`` that PaRO wrapped (all of them, or none).

    Raises:
        RuntimeError: some parts are PaRO models and others are not.
    """
    wrapped = [m for m in model_parts if m in PARO_MODELS]
    if wrapped and len(wrapped) != len(model_parts):
        raise RuntimeError("some model parts are wrapped by PaRO and some are not; parallelize every part alike")
    return wrapped
