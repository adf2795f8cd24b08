"""The torchtitan 0.2.2 adapter: PaRO switched on from the job TOML.

``[experimental] custom_import = "torchtitan_patch"`` imports ``torchtitan_patch`` inside
torchtitan's trainer, before it looks up the model's train spec; with torchtitan 0.2.2
installed that imports this package, and :func:`install`:

- registers train specs for ``llama3`` and ``qwen3`` (torchtitan's ``register_train_spec``:
  user specs take precedence over built-in ones). They are torchtitan's own specs with a
  PaRO-aware ``parallelize_fn``, optimizer builder, metrics processor and a dataloader that
  refuses to reshard its state; with ``parallelism.paro_strategy`` unset each delegates to
  torchtitan's original, so the run is stock torchtitan. Either way the model parts it returns
  start from the unsharded model's weights, whatever the layout (:mod:`torchtitan_patch.init`);
- registers the ``local_text`` dataset (offline text files; see :mod:`torchtitan_patch.data`);
- routes the trainer's gradient clipping through :mod:`torchtitan_patch.clip`, the one
  torchtitan function replaced in place (the trainer calls it by module attribute);
- scopes the default process group's store to the torchrun attempt, so a job restarted by
  ``torchrun --max-restarts`` starts again (see :mod:`torchtitan_patch.elastic`);
- checks checkpoints: a checksum manifest after each save, and before each load the files,
  the model and the data-parallel degree they fit (see :mod:`torchtitan_patch.checkpoint`).

``[job] custom_config_module = "torchtitan_patch.job_config"`` adds the PaRO fields.
``python -m torchtitan_patch.train`` is ``torchtitan.train`` plus CPU mode.
"""

from __future__ import annotations

import dataclasses
import importlib

from torchtitan.protocols.train_spec import register_train_spec

from torchtitan_patch import checkpoint, clip, elastic
from torchtitan_patch.data import register_dataset
from torchtitan_patch.init import full_tensor_init
from torchtitan_patch.settings import SUPPORTED_MODELS
from torchtitan_patch.v0_2 import flavors  # noqa: F401  (adds llama3 flavors, e.g. 57M)
from torchtitan_patch.v0_2.data import build_dataloader
from torchtitan_patch.v0_2.metrics import build_paro_metrics_processor
from torchtitan_patch.v0_2.optimizer import build_paro_optimizers
from torchtitan_patch.v0_2.parallelize import paro_parallelize_fn


def _register_train_specs() -> None:
    for name in SUPPORTED_MODELS:
        stock = importlib.import_module(f"torchtitan.models.{name}").get_train_spec()
        spec = dataclasses.replace(
            stock,
            parallelize_fn=full_tensor_init(paro_parallelize_fn(stock.parallelize_fn)),
            build_optimizers_fn=build_paro_optimizers,
            build_metrics_processor_fn=build_paro_metrics_processor,
            build_dataloader_fn=build_dataloader,
        )
        try:
            register_train_spec(name, spec)
        except ValueError:  # already registered: this package imported twice, or the user's own spec
            pass


_installed = False


def install() -> None:
    """Apply everything above (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    register_dataset()
    _register_train_specs()
    clip.install()
    elastic.install()
    # 0.2.2's CheckpointManager(dataloader, model_parts, optimizers, lr_schedulers, states, checkpoint_config, ...)
    checkpoint.install(lambda args, kwargs: kwargs.get("checkpoint_config", args[5] if len(args) > 5 else None))
