"""torchtitan 0.2.2's train spec ``parallelize_fn`` with PaRO (:mod:`torchtitan_patch.parallelize`).

0.2.2's parallelize functions apply data parallelism only when its degrees are above 1, so
the stock function runs with them hidden and stops before the FSDP/HSDP/DDP step.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import torch.nn as nn
from torchtitan.distributed import ParallelDims

from torchtitan_patch.parallelize import blocks_of, parallelize_with_paro
from torchtitan_patch.settings import paro_settings


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
        return parallelize_with_paro(model, settings, parallel_dims, job_config, blocks_of(model))

    return parallelize
