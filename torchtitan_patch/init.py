"""Initial weights that do not depend on the parallel layout or the device.

torchtitan builds the model on the meta device, parallelizes it (tensor parallelism, FSDP /
HSDP / DDP or PaRO, pipeline stages), moves it to the device with ``to_empty`` and only then
calls ``model.init_weights()``, on the sharded model. Its random ops (``normal_``, the
``uniform_`` / ``normal_`` draws inside ``trunc_normal_``) then run on DTensors, and what a
DTensor random op draws depends on the layout:

- on CPU, DTensor keeps no RNG tracker (``is_rng_supported_mesh`` is false: ``torch.cpu`` has
  no ``set_rng_state``), so every rank fills its local shard from the start of the same CPU
  stream. A parameter sharded over m ranks gets m copies of the first 1/m of the draws, and the
  stream advances by the local size only, so every later parameter differs too;
- on CUDA, the ``OffsetBasedRNGTracker`` gives each shard its own Philox offset, so shards
  differ, but the values still depend on the shard shapes, and ``torch.nn.init.trunc_normal_``
  resamples out-of-range values per shard, in a loop whose draws depend on the values;
- under pipeline parallelism torchtitan seeds every stage differently, and a stage initializes
  only its own layers;
- a replicated parameter (DDP, PaRO P=N) is drawn as a full tensor, so it gets yet other values.

So two layouts seeded alike start from different weights, and their losses differ for that
reason alone. :func:`full_tensor_init` fixes it by wrapping a train spec's ``parallelize_fn``:
every model part it returns gets an ``init_weights`` that

1. runs torchtitan's own ``init_weights`` on the part (buffers, and anything else it sets,
   exactly as before), then
2. builds the whole unsharded model on CPU, initializes it with the model's own
   ``init_weights`` from the job's seed (``debug.seed``; without one, rank 0's) on the CPU
   generator, forked so the process's RNG state is left as it was, and
3. copies into every parameter and buffer of the part the piece this rank holds: the full
   tensor for a plain tensor, else the local shard of its DTensor placements (the split
   ``distribute_tensor`` makes, without communication), moved to the part's device.

Every strategy, mesh, TP / PP degree and device therefore starts from the same values, bit for
bit: those a single CPU process gets from torchtitan's ``init_weights`` with the same seed (the
whole init, elementwise transforms included, runs on CPU; only the result is copied to the
device; not run on a GPU here).

Cost: each rank holds the whole model once more in host memory (its parameters and buffers at
the training dtype) while it initializes, and draws every random value of the whole model on
CPU (for the llama3 debug model, 25 MB and well under a second; for an 8B model in fp32, 32 GB
per rank and a few minutes of CPU). When that does not fit in 80% of the host memory available
to each local rank on some rank, every rank skips the step with a warning and keeps
torchtitan's layout-dependent values; a seed checkpoint (``--checkpoint.create_seed_checkpoint``
on one process, which initializes the unsharded model) gives layout-independent weights then.
``debug.layout_independent_init = false`` turns it off.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.tools import utils as tt_utils
from torchtitan.tools.logging import logger

from paro_fsdp.comm.device import all_gather_object

# Module wrappers torchtitan may put between a model and its parameters (activation
# checkpointing, torch.compile); the unsharded model has none.
_WRAPPER_NAMES = ("_checkpoint_wrapped_module", "_orig_mod")
# Share of a local rank's available host memory the full model may take.
_MEMORY_FRACTION = 0.8


def enabled(job_config: Any) -> bool:
    """Whether the job asks for layout-independent initial weights (the default)."""
    return bool(getattr(job_config.debug, "layout_independent_init", True))


def canonical_name(name: str) -> str:
    """A parameter's name in the unsharded model: ``name`` without wrapper segments."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_NAMES)


def local_piece(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The part of ``full`` (a whole parameter) that ``like`` holds on this rank.

    For a DTensor, each mesh dimension's placement splits the tensor in turn, as
    ``distribute_tensor(..., src_data_rank=None)`` does, but on ``full``'s device (the
    unsharded copy never goes to the accelerator). A plain tensor holds all of ``full``.
    """
    if not isinstance(like, DTensor):
        return full
    mesh, piece = like.device_mesh, full
    for mesh_dim, placement in enumerate(like.placements):
        if isinstance(placement, _StridedShard):
            dim = placement.dim % full.ndim
            piece = _StridedShard._make_shard_tensor(dim, piece, mesh, mesh_dim, None,
                                                     split_factor=placement.split_factor)
        elif isinstance(placement, Shard):
            piece = Shard._make_shard_tensor(placement.dim % full.ndim, piece, mesh, mesh_dim, None)
        elif isinstance(placement, Partial) or not isinstance(placement, Replicate):
            raise ValueError(f"cannot initialize a DTensor placed as {like.placements}: {placement} is not a split")
    return piece


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _state(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from ((name, b) for name, b in module.named_buffers() if b is not None)


def _host_memory_per_rank() -> int | None:
    """Bytes of host memory available to each process on this host (Linux), or None."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    return available // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for _, t in _state(module))


class FullTensorInit:
    """``init_weights`` for one model part: torchtitan's, then the unsharded model's values.

    Args:
        part: the parallelized model part (its ``init_weights`` is replaced by this object).
        full: the whole unsharded model, on the meta device.
        seed: the seed every rank initializes the unsharded model with.
    """

    def __init__(self, part: nn.Module, full: nn.Module, seed: int) -> None:
        self.stock = part.init_weights  # torchtitan's, bound to the part
        self.full: nn.Module | None = full
        self.seed = seed

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self.stock(*args, **kwargs)
        if self.full is None:
            raise RuntimeError("init_weights ran twice; the unsharded model was already released")
        full, self.full = self.full, None
        self.copy_into(full, self.stock.__self__)
        return result

    @torch.no_grad()
    def copy_into(self, full: nn.Module, part: nn.Module) -> None:
        """Initialize ``full`` (on meta) on CPU from the seed and copy its values into ``part``."""
        full.to_empty(device="cpu")
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.seed)
            full.init_weights()
        values = dict(_state(full))
        copied = 0
        for name, tensor in _state(part):
            key = canonical_name(name)
            source = values.get(key)
            if source is None or tuple(source.shape) != tuple(tensor.shape) or source.dtype != tensor.dtype:
                found = "absent" if source is None else f"{tuple(source.shape)} {source.dtype}"
                raise RuntimeError(
                    f"layout-independent init: {name} ({tuple(tensor.shape)} {tensor.dtype}) does not match the "
                    f"unsharded model's {key} ({found}); set debug.layout_independent_init = false for this model"
                )
            piece, local = local_piece(source, tensor), _local(tensor)
            if piece.shape != local.shape:
                raise RuntimeError(
                    f"layout-independent init: {name}'s local shard is {tuple(local.shape)} but its placements "
                    f"{getattr(tensor, 'placements', None)} cut {tuple(piece.shape)} from the full tensor"
                )
            local.copy_(piece)
            copied += 1
        logger.info(f"Initial weights: {copied} tensors of the unsharded model initialized on CPU with seed "
                    f"{self.seed} (the same whatever the layout)")


def _agree(job_config: Any, needed: int) -> tuple[int, bool]:
    """The job's seed, and whether the unsharded model fits in host memory on every rank.

    Without ``debug.seed``, torchtitan drew one on rank 0 and seeded every rank with it (plus
    the pipeline stage under PP); rank 0 is stage 0, so its initial seed is the one drawn.
    """
    available = _host_memory_per_rank()
    fits = available is None or needed <= _MEMORY_FRACTION * available
    mine = (torch.initial_seed(), fits, available)
    everyone = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = all_gather_object(mine)  # on the default group's device (NCCL: this GPU)
    seed = job_config.debug.seed
    seed = int(everyone[0][0]) if seed is None else int(seed)
    if not all(f for _, f, _ in everyone):
        least = min(a for _, f, a in everyone if not f)
        logger.warning(
            f"Initial weights depend on the parallel layout: the unsharded model ({needed / 2**30:.1f} GiB) does "
            f"not fit in {_MEMORY_FRACTION:.0%} of a rank's share of host memory ({least / 2**30:.1f} GiB) on "
            f"some rank, so torchtitan's sharded init_weights is used. For layout-independent weights, create "
            f"a seed checkpoint (--checkpoint.create_seed_checkpoint, one process) and load it; "
            f"debug.layout_independent_init = false silences this."
        )
    return seed, all(f for _, f, _ in everyone)


def _unsharded_twin(model: nn.Module) -> nn.Module | None:
    """A new whole model like ``model``: from ``model_args`` on torchtitan 0.2.2, its ``config`` on 0.3."""
    args = getattr(model, "model_args", None)
    if args is not None:
        return type(model)(args)
    config = getattr(model, "config", None)
    return config.build() if hasattr(config, "build") else None


def full_tensor_init(parallelize_fn: Callable[..., nn.Module], job: Any = None) -> Callable[..., nn.Module]:
    """Wrap a model's parallelize function so the parts it returns initialize layout-independently.

    The unsharded model is rebuilt from the (meta, not yet parallelized) model torchtitan passes
    in; under PP that is a stage, whose ``model_args`` (0.2.2) or ``config`` (0.3) still describe
    the whole model. Other models keep torchtitan's init. Every rank calls this hook alike, and
    it agrees on the seed and on the memory check with one collective.

    Args:
        parallelize_fn: a train spec's ``parallelize_fn(model, parallel_dims, job_config)``
            (0.2.2), or a model spec's ``parallelize_fn(model, *, parallel_dims, ...)`` (0.3).
        job: for 0.3, the run's config as :func:`torchtitan_patch.v0_3.config.job_view`
            presents it; 0.2.2 passes its job config to the function.
    """

    @functools.wraps(parallelize_fn)
    def parallelize(model: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        job_config = job if job is not None else args[1]
        full = None
        if enabled(job_config):  # built before parallelize_fn turns the model's class into FSDP's
            with torch.device("meta"), tt_utils.set_default_dtype(TORCH_DTYPE_MAP[job_config.training.dtype]):
                full = _unsharded_twin(model)
        part = parallelize_fn(model, *args, **kwargs)
        if full is None or not hasattr(part, "init_weights"):
            return part
        seed, fits = _agree(job_config, _nbytes(full))
        if fits:
            # An instance attribute: the trainer calls part.init_weights(buffer_device=...).
            part.init_weights = FullTensorInit(part, full, seed)
        return part

    return parallelize
