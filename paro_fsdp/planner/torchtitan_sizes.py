"""Model sizes and training setup from a torchtitan job: a TOML file or a built model.

torchtitan is imported only here and only when called, so the planner works without it.
"""

from __future__ import annotations

import importlib
import os
import tomllib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from paro_fsdp.planner.inputs import ModelSizes

if TYPE_CHECKING:
    import torch
    from torch import nn

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Korthikanti et al. (2022): a transformer layer keeps about 34 * hidden bytes per token of
# 16-bit activations for backward (attention scores excluded: SDPA / flash do not store them).
_ACT_BYTES_PER_TOKEN_PER_DIM = 34 / 2


def _local_numel(param: "torch.Tensor") -> int:
    from torch.distributed.tensor import DTensor  # noqa: PLC0415 (the planner imports torch only for models)

    return param.to_local().numel() if isinstance(param, DTensor) else param.numel()


def sizes_from_model(model: "nn.Module", flops_per_token: float | None = None, param_bytes: int = 4,
                     grad_bytes: int = 4, optim_bytes: int = 8, gather_bytes: int | None = None,
                     reduce_bytes: int | None = None, bucket_cap_mb: float | None = None) -> ModelSizes:
    """Sizes of a (possibly meta-device) torchtitan-style model with ``model.layers`` blocks.

    Trainable parameters are those with ``requires_grad``; each block is one FSDP unit (where
    P = N, blocks share units up to ``bucket_cap_mb``, as ``paro_parallelize`` cuts them) and the
    largest one sizes the transient buffers. A tensor-parallel DTensor counts its local shard:
    that is what each rank holds and data-parallel sharding divides further.
    """
    params = list(model.parameters())  # shared (tied) parameters appear once
    layers = getattr(model, "layers", None)
    if layers is None or len(layers) == 0:
        raise ValueError(f"{type(model).__name__} has no `layers` blocks: the planner needs one FSDP unit per block")
    blocks = list(layers.values()) if hasattr(layers, "values") else list(layers)
    trainable = sum(_local_numel(p) for p in params if p.requires_grad)
    if trainable == 0:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (requires_grad=False everywhere)")
    return ModelSizes(
        params=sum(_local_numel(p) for p in params),
        trainable=trainable,
        blocks=len(blocks),
        block_params=max(sum(_local_numel(p) for p in b.parameters()) for b in blocks),
        param_bytes=param_bytes, grad_bytes=grad_bytes, optim_bytes=optim_bytes,
        gather_bytes=gather_bytes, reduce_bytes=reduce_bytes,
        flops_per_token=flops_per_token, bucket_cap_mb=bucket_cap_mb,
    )


@dataclass(frozen=True)
class TorchtitanJob:
    """What the planner reads from a torchtitan TOML."""

    name: str
    flavor: str
    model: ModelSizes
    dim: int
    seq_len: int
    local_batch_size: int
    global_batch_size: int
    activation_checkpoint: str
    activation_dtype_bytes: int
    groups: int | None = None  # parallelism.data_parallel_replicate_degree, when set
    group_size: int | None = None  # parallelism.data_parallel_shard_degree, when set
    comm: str | None = None  # parallelism.paro_comm, when set
    ho_ring_chunks: int | None = None  # parallelism.paro_ho_ring_chunks, when set and not 0 (HO-Ring's default)

    def accum(self, data_parallel: int) -> int:
        """Micro-steps per optimizer step on ``data_parallel`` ranks (torchtitan's rule)."""
        if self.global_batch_size <= 0:
            return 1
        per_micro_step = self.local_batch_size * data_parallel
        if self.global_batch_size % per_micro_step:
            raise ValueError(
                f"training.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"training.local_batch_size * data-parallel ranks ({self.local_batch_size} * {data_parallel})"
            )
        return self.global_batch_size // per_micro_step

    @property
    def tokens_per_micro_step(self) -> int:
        return self.local_batch_size * self.seq_len

    def activation_bytes(self) -> float:
        """Rough activation memory per rank; ``selective`` is counted as ``none`` (an upper bound)."""
        per_layer = _ACT_BYTES_PER_TOKEN_PER_DIM * self.activation_dtype_bytes * self.dim * self.tokens_per_micro_step
        if self.activation_checkpoint == "full":
            # Block inputs of every layer plus one layer recomputed at a time.
            return self.model.blocks * self.activation_dtype_bytes * self.dim * self.tokens_per_micro_step + per_layer
        return self.model.blocks * per_layer


def _section(doc: dict, name: str, path: str) -> dict:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise ValueError(f"{path}: [{name}] must be a table, got {type(value).__name__}")
    return value


def read_torchtitan_job(path: str | os.PathLike, optim_bytes: int = 8) -> TorchtitanJob:
    """Parse ``[model] name/flavor`` and ``[training]`` of a torchtitan TOML and size the model.

    The model is built on the meta device from torchtitan's registered model args, so counts
    (tied embeddings, qk norms, MoE experts) are the model's own.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"torchtitan config {path!r} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"torchtitan config {path!r} is not valid TOML: {e}") from None
    model_cfg, training = _section(doc, "model", path), _section(doc, "training", path)
    name, flavor = model_cfg.get("name", "llama3"), model_cfg.get("flavor", "debugmodel")
    precision = {}
    for key, default in (("mixed_precision_param", "bfloat16"), ("mixed_precision_reduce", "float32")):
        value = training.get(key, default)
        if value not in _DTYPE_BYTES:
            raise ValueError(f"{path}: training.{key} = {value!r}; expected one of {', '.join(_DTYPE_BYTES)}")
        precision[key] = _DTYPE_BYTES[value]
    ac_mode = _section(doc, "activation_checkpoint", path).get("mode", "selective")
    parallelism = _section(doc, "parallelism", path)
    degrees = {}
    for key in ("data_parallel_replicate_degree", "data_parallel_shard_degree"):
        value = parallelism.get(key)
        degrees[key] = value if isinstance(value, int) and value >= 1 else None  # -1: torchtitan infers it

    import torch  # noqa: PLC0415 (lazy: torchtitan is optional for the planner)

    custom = _section(doc, "experimental", path).get("custom_import", "")
    if custom:
        importlib.import_module(custom)
    from torchtitan.protocols.train_spec import get_train_spec  # noqa: PLC0415

    try:
        spec = get_train_spec(name)
    except ValueError as e:
        raise ValueError(f"{path}: model.name = {name!r} is not a registered torchtitan model ({e})") from None
    if flavor not in spec.model_args:
        raise ValueError(f"{path}: model.flavor = {flavor!r} is not a flavor of {name!r}; "
                         f"valid: {', '.join(spec.model_args)}")
    args = spec.model_args[flavor]
    seq_len = int(training.get("seq_len", 2048))
    with torch.device("meta"):
        module = spec.model_cls(args)
    _, flops_per_token = args.get_nparams_and_flops(module, seq_len)
    sizes = sizes_from_model(module, flops_per_token=float(flops_per_token), param_bytes=4, grad_bytes=4,
                             optim_bytes=optim_bytes, gather_bytes=precision["mixed_precision_param"],
                             reduce_bytes=precision["mixed_precision_reduce"])
    return TorchtitanJob(
        name=name, flavor=flavor, model=sizes, dim=int(args.dim), seq_len=seq_len,
        local_batch_size=int(training.get("local_batch_size", 8)),
        global_batch_size=int(training.get("global_batch_size", -1)),
        activation_checkpoint=str(ac_mode),
        activation_dtype_bytes=precision["mixed_precision_param"],
        groups=degrees["data_parallel_replicate_degree"], group_size=degrees["data_parallel_shard_degree"],
        comm=parallelism.get("paro_comm"),
        ho_ring_chunks=parallelism.get("paro_ho_ring_chunks") or None,
    )
