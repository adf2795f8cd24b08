"""torchtitan 0.3's model ``parallelize_fn`` with PaRO (:mod:`torchtitan_patch.parallelize`).

0.3's parallelize functions (``parallelize_llama``, ``parallelize_qwen3``) end with
``apply_fsdp_to_decoder``, which they run even with one data-parallel rank (it installs
FSDP2's mixed precision), so hiding the degrees as on 0.2.2 would still wrap the model in
FSDP. Instead the stock function runs with that one step taken out: while it runs, the name
``apply_fsdp_to_decoder`` in its module resolves to a stand-in that wraps nothing, and PaRO
wraps the model afterwards. Tensor parallelism, activation checkpointing and compile are
exactly torchtitan's.

With tied embeddings the output projection ``lm_head`` shares the root unit's weight; 0.3's
chunked loss calls it after the model's forward, so the root keeps its parameters gathered
until its backward, as torchtitan's unit of embeddings, norm and ``lm_head`` does.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch.nn as nn

from torchtitan_patch.parallelize import blocks_of, parallelize_with_paro
from torchtitan_patch.settings import paro_settings

_DP_STEP = "apply_fsdp_to_decoder"


def _skip_data_parallel(model: nn.Module, *args: Any, **kwargs: Any) -> None:
    """Takes the place of ``apply_fsdp_to_decoder``: PaRO wraps the model instead."""


@contextlib.contextmanager
def _without_data_parallel(stock: Callable[..., nn.Module]) -> Iterator[None]:
    namespace = stock.__globals__
    if _DP_STEP not in namespace:
        raise RuntimeError(
            f"{stock.__module__}.{stock.__qualname__} does not call {_DP_STEP}; PaRO cannot take its data-parallel "
            f"step's place in this model (supported: the llama3 and qwen3 dense models of torchtitan 0.3)"
        )
    original = namespace[_DP_STEP]
    namespace[_DP_STEP] = _skip_data_parallel
    try:
        yield
    finally:
        namespace[_DP_STEP] = original


def paro_parallelize_fn(stock: Callable[..., nn.Module], job: Any) -> Callable[..., nn.Module]:
    """A ``ModelSpec.parallelize_fn``: ``stock`` as is, or ``stock`` without its FSDP step and then PaRO.

    Args:
        stock: the model's own parallelize function.
        job: the run's config as :func:`torchtitan_patch.v0_3.config.job_view` presents it.
    """

    @functools.wraps(stock)
    def parallelize(model: nn.Module, *, parallel_dims: Any, **kwargs: Any) -> nn.Module:
        settings = paro_settings(job, parallel_dims.world_size)
        if settings is None:
            return stock(model, parallel_dims=parallel_dims, **kwargs)
        with _without_data_parallel(stock):
            model = stock(model, parallel_dims=parallel_dims, **kwargs)
        model = parallelize_with_paro(model, settings, parallel_dims, job, blocks_of(model))
        if getattr(model, "enable_weight_tying", False):
            model.set_reshard_after_forward(False, recurse=False)
        return model

    return parallelize
