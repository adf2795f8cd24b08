"""PaRO in place of torchtitan's FSDP/HSDP/DDP step, for any torchtitan release.

torchtitan's model parallelize function applies tensor parallelism, activation checkpointing
and compile, then wraps data parallelism. Each adapter's parallelize hook runs that function
without its data-parallel step (how depends on the release) and then calls
:func:`parallelize_with_paro`: the strategy (with ``paro_strategy = "auto"``, the planner's
choice, :mod:`torchtitan_patch.auto`), then :func:`paro_fsdp.paro_parallelize` on the
``(dp_replicate, dp_shard)`` mesh. Pipeline parallelism calls the hook once per stage. Every
wrapped model is registered in :mod:`torchtitan_patch.models`, which drives its gradient sync.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.distributed import ParallelDims
from torchtitan.tools.logging import logger

from paro_fsdp import paro_parallelize
from torchtitan_patch.auto import auto_strategy
from torchtitan_patch.models import register_paro_model
from torchtitan_patch.settings import ParoSettings


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


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """PaRO's blocks of a torchtitan model part: embeddings, each transformer block, the output
    projection; the root takes the rest (where P = N the blocks are bucketed and a small
    embedding or projection stays with the root, :func:`paro_fsdp.parallelize.bucket_blocks`).

    The projection is ``output`` in torchtitan 0.2.2 and ``lm_head`` in 0.3; weight tying is a
    field of ``model_args`` in 0.2.2 and of the model in 0.3. With tied embeddings the shared
    weight must sit in one unit, so both stay with the root.
    """
    tied = getattr(getattr(model, "model_args", model), "enable_weight_tying", False)
    head = getattr(model, "output", None) or getattr(model, "lm_head", None)
    blocks: list[nn.Module] = []
    if getattr(model, "tok_embeddings", None) is not None and not tied:
        blocks.append(model.tok_embeddings)
    blocks.extend(model.layers.values())
    if head is not None and not tied:
        blocks.append(head)
    return blocks


def _reshard_after_forward(policy: str, pp_enabled: bool) -> bool:
    """torchtitan's ``fsdp_reshard_after_forward`` policy, as its apply_fsdp reads it."""
    if policy not in ("default", "always", "never"):
        raise ValueError(f"parallelism.fsdp_reshard_after_forward={policy!r}; valid: default, always, never")
    return policy == "always" or (policy == "default" and not pp_enabled)


def apply_paro(model: nn.Module, settings: ParoSettings, mesh: DeviceMesh, parallel_dims: ParallelDims,
               job_config: Any, blocks: list[nn.Module]) -> nn.Module:
    """Wrap a model that torchtitan has already TP/AC/compile-transformed with PaRO on ``mesh``."""
    training = job_config.training
    model = paro_parallelize(
        model,
        mesh,
        strategy=settings.strategy,
        blocks=blocks,
        comm=settings.comm,
        ho_ring_chunks=settings.ho_ring_chunks,
        quant=settings.quant,
        bucket_cap_mb=settings.bucket_cap_mb,
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
    register_paro_model(model, job_config, parallel_dims)
    logger.info(f"Applied {settings.describe()} to the model")
    return model


def parallelize_with_paro(model: nn.Module, settings: ParoSettings, parallel_dims: ParallelDims,
                          job_config: Any, blocks: list[nn.Module]) -> nn.Module:
    """PaRO on a model part that torchtitan has already TP/AC/compile-transformed (``auto`` resolved first).

    ``blocks`` are the part's units (:func:`blocks_of`), the root takes the rest.
    """
    mesh = paro_mesh(parallel_dims)
    if settings.auto or settings.plans_collectives:
        choice = auto_strategy(model, settings, mesh, parallel_dims, job_config)
        settings = settings.with_choice(choice.strategy, choice.quant, choice.comm, choice.ho_ring_chunks)
    return apply_paro(model, settings, mesh, parallel_dims, job_config, blocks)
