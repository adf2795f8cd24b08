"""The torchtitan 0.3 adapter: PaRO switched on from a config function and the command line.

    torchrun --nproc-per-node 4 -m torchtitan_patch.train \\
        --module torchtitan_patch.v0_3 --config llama3_debug_paro --parallelism.paro_strategy IIG

``--module torchtitan_patch.v0_3`` makes torchtitan read config functions from
:mod:`torchtitan_patch.v0_3.config_registry` (ours mirror ``train_configs/``); each returns a
:class:`ParoTrainer.Config`, torchtitan's ``Trainer.Config`` with the PaRO fields under
``parallelism`` (:mod:`torchtitan_patch.v0_3.config`), and ``config.build()`` makes a
:class:`ParoTrainer`. With an accelerator, ``-m torchtitan.train`` works as well;
``-m torchtitan_patch.train`` adds CPU mode.
"""

from torchtitan_patch.v0_3.trainer import ParoTrainer, install

install()

__all__ = ["ParoTrainer"]
