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

from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
from torchtitan.distributed.activation_checkpoint import FullAC
from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader
from torchtitan.models.llama3 import config_registry as llama3
from torchtitan.models.qwen3 import config_registry as qwen3
from torchtitan.trainer import Trainer

from torchtitan_patch.data import DATASET_NAME
from torchtitan_patch.v0_3.config import ParoDebugConfig, ParoParallelismConfig
from torchtitan_patch.v0_3.trainer import ParoTrainer

TOKENIZER = str(Path(__file__).resolve().parents[1] / "assets" / "tokenizer")


def _fields(config: object) -> dict[str, object]:
    return {f.name: getattr(config, f.name) for f in fields(config) if f.init}


def paro_config(config: Trainer.Config) -> ParoTrainer.Config:
    """``config`` as a ``ParoTrainer.Config``: the same fields, with the PaRO fields at their defaults (off)."""
    values = _fields(config)
    values["parallelism"] = ParoParallelismConfig(**{**_fields(config.parallelism), "spmd_backend": "partial_dtensor"})
    values["debug"] = ParoDebugConfig(**_fields(config.debug))
    return ParoTrainer.Config(**values)


def _offline(config: ParoTrainer.Config, dump_folder: str, dataset_path: str | None = None) -> None:
    """Read ``local_text`` (the shipped corpus unless ``dataset_path``) with the shipped tokenizer."""
    config.dump_folder = dump_folder
    config.dataloader = HuggingFaceTextDataLoader.Config(dataset=DATASET_NAME, dataset_path=dataset_path)
    config.metrics.enable_tensorboard = True


def llama3_debug_paro() -> ParoTrainer.Config:
    """llama3 debug model, PaRO IIG + HO-Ring on 2 groups x 2 ranks (``train_configs/llama3_debug_paro.toml``)."""
    config = paro_config(llama3.llama3_debugmodel())
    _offline(config, "./outputs/llama3_debug_paro")
    config.hf_assets_path = TOKENIZER
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
    config.parallelism.paro_comm = "ho_ring"
    config.checkpoint.enable = False
    config.checkpoint.interval = 10
    config.checkpoint.last_save_model_only = False
    config.debug.seed = 42
    return config
