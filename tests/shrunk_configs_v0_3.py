"""Our torchtitan 0.3 config functions with llama3's debug model in place of theirs.

Test code only (``--module shrunk_configs_v0_3``, with ``tests/`` on ``PYTHONPATH``): a 0.3
model spec cannot be changed on the command line, so these swap it before tyro applies the
size overrides; every other setting stays the config function's own.
"""

from __future__ import annotations

from torchtitan.models.common.config_utils import decoder_vocab_size
from torchtitan.models.llama3 import model_registry

from torchtitan_patch.v0_3 import ParoTrainer, config_registry


def _debug_model(config: ParoTrainer.Config) -> ParoTrainer.Config:
    config.model_spec = model_registry("debugmodel")
    config.loss.loss_fn.global_vocab_size = decoder_vocab_size(config.model_spec)
    return config


def llama3_8b_paro() -> ParoTrainer.Config:
    return _debug_model(config_registry.llama3_8b_paro())


def llama3_70b_paro() -> ParoTrainer.Config:
    return _debug_model(config_registry.llama3_70b_paro())
