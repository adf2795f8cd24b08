"""The parallelize hook: torchtitan's TP / AC / compile, then PaRO in place of FSDP/HSDP/DDP.

torchtitan's model ``parallelize_fn`` applies tensor parallelism, activation checkpointing
and compile, then wraps data parallelism. :func:`paro_parallelize_fn` runs that same
function with the data-parallel degrees hidden (so it stops before the FSDP/HSDP/DDP
step), then hands the model to :func:`paro_fsdp.paro_parallelize` on the
``(dp_replicate, dp_shard)`` mesh. With ``paro_strategy = "auto"`` the planner chooses the
strategy in between (:mod:`torchtitan_patch.auto`). Pipeline parallelism calls the hook once
per stage. With ``paro_strategy`` unset, the stock function runs untouched.
"""

from __future__ import annotations

import copy
import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.distributed import ParallelDims
from torchtitan.tools.logging import logger

from paro_fsdp import paro_parallelize
from paro_fsdp.strategy import ParoStrategy
from torchtitan_patch.auto import choose_auto_strategy
from torchtitan_patch.settings import ParoSettings, paro_settings

# Models this process wrapped with PaRO, and what drives their gradient sync; the optimizer
# builder, the gradient clipping and the metrics look them up here.
PARO_MODELS: "weakref.WeakKeyDictionary[nn.Module, GradientSyncDriver]" = weakref.WeakKeyDictionary()

# "auto": the strategy chosen for a trainer, by id of its ParallelDims (unhashable), with a
# reference that proves the id is still that object. Pipeline stages after the first reuse it.
_AUTO_CHOICES: "dict[int, tuple[weakref.ref[ParallelDims], ParoStrategy]]" = {}


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
    """

    def __init__(self, model: nn.Module, backwards_per_step: int, pipeline: bool) -> None:
        self.backwards_per_step = backwards_per_step
        self.micro_batch = 0
        self._set_sync = type(model).set_requires_gradient_sync.__get__(model)
        if pipeline:
            model.set_requires_gradient_sync = self._from_schedule
        else:
            model.register_forward_pre_hook(self._before_forward)

    def _count(self) -> None:
        self.micro_batch += 1
        self._set_sync(self.micro_batch % self.backwards_per_step == 0)

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        if module.training and torch.is_grad_enabled():
            self._count()

    def _from_schedule(self, requires_gradient_sync: bool, *, recurse: bool = True) -> None:
        if not requires_gradient_sync:  # the schedule is about to run a backward
            self._count()

    def reset(self) -> None:
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


def paro_mesh(parallel_dims: ParallelDims) -> DeviceMesh:
    """The ``(dp_replicate, dp_shard)`` mesh of this rank, on the same root mesh as TP's.

    torchtitan names the shard dimension ``fsdp``; PaRO's mesh names it ``dp_shard``. Re-viewing
    the world mesh keeps TP DTensors and PaRO's mesh on one root, which FSDP2 needs for 2D.
    The pp and tp dimensions of this view are never used, so they get no process groups.
    """
    pd = parallel_dims
    mesh = pd.world_mesh._unflatten(
        0,
        (pd.pp, pd.dp_replicate, pd.dp_shard, pd.tp),
        ("pp", "dp_replicate", "dp_shard", "tp"),
        backend_override={"pp": "fake", "tp": "fake"},
    )
    return mesh["dp_replicate", "dp_shard"]


def _blocks(model: nn.Module) -> list[nn.Module]:
    """torchtitan's FSDP units: embeddings, each transformer block, the output projection.

    With tied embeddings the shared weight must sit in one unit, so both stay with the root.
    """
    tied = getattr(getattr(model, "model_args", None), "enable_weight_tying", False)
    blocks: list[nn.Module] = []
    if getattr(model, "tok_embeddings", None) is not None and not tied:
        blocks.append(model.tok_embeddings)
    blocks.extend(model.layers.values())
    if getattr(model, "output", None) is not None and not tied:
        blocks.append(model.output)
    return blocks


def _reshard_after_forward(policy: str, pp_enabled: bool) -> bool:
    """torchtitan's ``fsdp_reshard_after_forward`` policy, as its apply_fsdp reads it."""
    if policy not in ("default", "always", "never"):
        raise ValueError(f"parallelism.fsdp_reshard_after_forward={policy!r}; valid: default, always, never")
    return policy == "always" or (policy == "default" and not pp_enabled)


def auto_strategy(model: nn.Module, settings: ParoSettings, mesh: DeviceMesh, parallel_dims: ParallelDims,
                  job_config: Any) -> ParoStrategy:
    """The strategy "auto" chose for this trainer, choosing it (collectively) on the first call.

    Under pipeline parallelism the first call is every rank's first stage, so rank 0 plans
    with the sizes of its first stage.
    """
    key = id(parallel_dims)
    cached = _AUTO_CHOICES.get(key)
    if cached is not None and cached[0]() is parallel_dims:
        return cached[1]
    strategy = choose_auto_strategy(model, settings, mesh, job_config, backwards_per_step(job_config, parallel_dims))
    _AUTO_CHOICES[key] = (weakref.ref(parallel_dims, lambda _: _AUTO_CHOICES.pop(key, None)), strategy)
    return strategy


def apply_paro(model: nn.Module, settings: ParoSettings, mesh: DeviceMesh, parallel_dims: ParallelDims,
               job_config: Any) -> nn.Module:
    """Wrap a model that torchtitan has already TP/AC/compile-transformed with PaRO on ``mesh``."""
    training = job_config.training
    model = paro_parallelize(
        model,
        mesh,
        strategy=settings.strategy,
        blocks=_blocks(model),
        comm=settings.comm,
        mp_policy=MixedPrecisionPolicy(
            param_dtype=TORCH_DTYPE_MAP[training.mixed_precision_param],
            reduce_dtype=TORCH_DTYPE_MAP[training.mixed_precision_reduce],
        ),
        reshard_after_forward=_reshard_after_forward(
            job_config.parallelism.fsdp_reshard_after_forward, parallel_dims.pp_enabled
        ),
    )
    # torchtitan divides each rank's loss by the global token count and sums gradients over ranks.
    model.set_gradient_divide_factor(1.0)
    PARO_MODELS[model] = GradientSyncDriver(
        model, backwards_per_step(job_config, parallel_dims), pipeline=parallel_dims.pp_enabled
    )
    logger.info(f"Applied {settings.describe()} to the model")
    return model


def paro_parallelize_fn(stock: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """A train spec ``parallelize_fn``: ``stock`` as is, or ``stock`` without DP and then PaRO."""

    @functools.wraps(stock)
    def parallelize(model: nn.Module, parallel_dims: ParallelDims, job_config: Any) -> nn.Module:
        settings = paro_settings(job_config, parallel_dims.world_size)
        if settings is None:
            return stock(model, parallel_dims, job_config)
        without_dp = copy.copy(parallel_dims)  # shares the built meshes (TP, PP, ...)
        without_dp.dp_replicate = without_dp.dp_shard = 1
        model = stock(model, without_dp, job_config)
        mesh = paro_mesh(parallel_dims)
        if settings.auto:
            settings = settings.with_strategy(auto_strategy(model, settings, mesh, parallel_dims, job_config))
        return apply_paro(model, settings, mesh, parallel_dims, job_config)

    return parallelize


def paro_models(model_parts: list[nn.Module]) -> list[nn.Module]:
    """The parts of ``model_parts`` that PaRO wrapped (all of them, or none)."""
    wrapped = [m for m in model_parts if m in PARO_MODELS]
    if wrapped and len(wrapped) != len(model_parts):
        raise RuntimeError("some model parts are wrapped by PaRO and some are not; parallelize every part alike")
    return wrapped
