"""PaRO config functions for torchtitan 0.3 (``--module torchtitan_patch.v0_3 --config <name>``).

Each mirrors a file of ``train_configs/`` (the torchtitan 0.2.2 TOML of the same name) on
top of torchtitan's own config function for the model, so everything these do not set is
what torchtitan 0.3 ships. Every field can still be overridden on the command line
(``--parallelism.paro_strategy GGG``, ``--training.steps 50``, ...).

A config of your own: start from one of these, or turn any torchtitan ``Trainer.Config`` into
one that PaRO can run with :func:`paro_config`, then set ``parallelism.paro_strategy``::

    def my_run() -> ParoTrainer.Config:
        config = paro_config(my_torchtitan_config())
        config.parallelism.paro_strategy = "IIG"
        return config
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC
from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader
from torchtitan.models.llama3 import config_registry as llama3
from torchtitan.models.qwen3 import config_registry as qwen3
from torchtitan.trainer import Trainer

from torchtitan_patch.data import DATASET_NAME
from torchtitan_patch.v0_3.config import (
    ParoCheckpointConfig,
    ParoDebugConfig,
    ParoParallelismConfig,
)
from torchtitan_patch.v0_3.trainer import ParoTrainer

TOKENIZER = str(Path(__file__).resolve().parents[1] / "assets" / "tokenizer")


def _fields(config: object) -> dict[str, object]:
    return {f.name: getattr(config, f.name) for f in fields(config) if f.init}


def paro_config(config: Trainer.Config) -> ParoTrainer.Config:
    """``config`` as a ``ParoTrainer.Config``: the same fields, with the PaRO fields at their defaults (off)."""
    values = _fields(config)
    values["parallelism"] = ParoParallelismConfig(**{**_fields(config.parallelism), "spmd_backend": "partial_dtensor"})
    values["debug"] = ParoDebugConfig(**_fields(config.debug))
    if type(config.checkpoint) is CheckpointManager.Config:  # another manager keeps its own config
        values["checkpoint"] = ParoCheckpointConfig(**_fields(config.checkpoint))
    return ParoTrainer.Config(**values)


def _paro_job(config: ParoTrainer.Config, dump_folder: str, dataset_path: str | None) -> ParoTrainer.Config:
    """What every file of ``train_configs/`` sets: the ``local_text`` data (the shipped corpus
    unless ``dataset_path``), TensorBoard, full checkpoints (resumable, reshardable), no profiler."""
    config.dump_folder = dump_folder
    config.dataloader = HuggingFaceTextDataLoader.Config(dataset=DATASET_NAME, dataset_path=dataset_path)
    config.metrics.enable_tensorboard = True
    config.profiler.enable_profiling = False
    config.validator.enable = False
    config.checkpoint.folder = "checkpoint"
    config.checkpoint.last_save_model_only = False
    config.training.max_norm = 1.0
    config.training.disable_cuda_graphs = True  # PaRO's micro-batches differ (check_release_fields)
    config.parallelism.paro_comm = "auto"  # the planner's collectives and depth for the links at hand
    return config


def _debug_paro(stock: Trainer.Config, dump_folder: str) -> ParoTrainer.Config:
    """A debug model, PaRO IIG on 2 groups x 2 ranks, as ``train_configs/llama3_debug_paro.toml``."""
    config = _paro_job(paro_config(stock), dump_folder, None)
    config.hf_assets_path = TOKENIZER
    config.metrics.log_freq = 1
    config.optimizer = default_adamw(lr=3e-3)
    config.optimizer.implementation = "foreach"
    config.lr_scheduler = LRSchedulersContainer.Config(warmup_steps=2, decay_type="cosine", min_lr_factor=0.1)
    config.training.local_batch_size = 2
    config.training.global_batch_size = 16
    config.training.seq_len = 256
    config.training.steps = 20
    config.training.mixed_precision_param = "float32"
    config.parallelism.data_parallel_replicate_degree = 2
    config.parallelism.data_parallel_shard_degree = 2
    config.parallelism.paro_strategy = "IIG"
    config.checkpoint.enable = False
    config.checkpoint.interval = 10
    config.activation_checkpoint = SelectiveAC.Config()
    config.compile.enable = False
    config.debug.seed = 42
    return config


def llama3_debug_paro() -> ParoTrainer.Config:
    """llama3 debug model, PaRO IIG on 2 groups x 2 ranks (``train_configs/llama3_debug_paro.toml``)."""
    return _debug_paro(llama3.llama3_debugmodel(), "./outputs/llama3_debug_paro")


def qwen3_debug_paro() -> ParoTrainer.Config:
    """qwen3 debug model (tied embeddings), otherwise as :func:`llama3_debug_paro`."""
    return _debug_paro(qwen3.qwen3_debugmodel(), "./outputs/qwen3_debug_paro")


def _large(stock: Trainer.Config, dump_folder: str, global_batch_size: int, groups: int,
           strategy: str) -> ParoTrainer.Config:
    """A production run in bf16 on ``groups`` nodes x 8 GPUs, compiled, checkpointed."""
    config = _paro_job(paro_config(stock), dump_folder, "/data/corpus")  # your .txt / .jsonl files
    config.metrics.log_freq = 10
    config.lr_scheduler.warmup_steps = 200
    config.training.local_batch_size = 1
    config.training.global_batch_size = global_batch_size
    config.training.seq_len = 8192
    config.training.steps = 1000
    config.training.mixed_precision_param = "bfloat16"
    config.training.mixed_precision_reduce = "float32"
    config.parallelism.data_parallel_replicate_degree = groups  # groups = nodes
    config.parallelism.data_parallel_shard_degree = 8  # ranks per group = GPUs per node (the NVLink domain)
    config.parallelism.tensor_parallel_degree = 1
    config.parallelism.paro_strategy = strategy
    config.checkpoint.enable = True
    config.compile.enable = True
    config.compile.components = ["model", "loss"]
    return config


def llama3_8b_paro() -> ParoTrainer.Config:
    """Llama 3 8B, PaRO IIG, 4 nodes x 8 GPUs (``train_configs/llama3_8b_paro.toml``).

    bf16 compute: per parameter, a 2-byte copy at P = I and 4-byte gradients at G = I (1/8 of
    the model per GPU each), the fp32 master and AdamW's moments, 12 bytes at O = G (1/32):
    2 + 4 + 3 = 9 GB of model state per GPU.
    """
    config = _large(llama3.llama3_8b(), "./outputs/llama3_8b_paro", 128, 4, "IIG")
    config.checkpoint.interval = 500
    return config


def llama3_70b_paro() -> ParoTrainer.Config:
    """Llama 3 70B, PaRO IGG, 16 nodes x 8 GPUs (``train_configs/llama3_70b_paro.toml``).

    bf16 compute: per parameter, a 2-byte copy at P = I (1/8 of the model per GPU), 4-byte
    gradients and the 12 bytes of fp32 master and AdamW's moments at G (1/128):
    17.5 + 2.2 + 6.6 = 26 GB of model state per GPU.
    """
    config = _large(llama3.llama3_70b(), "./outputs/llama3_70b_paro", 256, 16, "IGG")
    config.activation_checkpoint = FullAC.Config()
    config.checkpoint.interval = 200
    return config
