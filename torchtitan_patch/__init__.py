"""PaRO for torchtitan: a version-independent core and one adapter per supported release.

- torchtitan 0.2.2 (``torchtitan_patch.v0_2``): ``[experimental] custom_import =
  "torchtitan_patch"`` in the job TOML imports this package, which installs that adapter;
  ``[job] custom_config_module = "torchtitan_patch.job_config"`` adds the PaRO fields.
- torchtitan 0.3.0 (``torchtitan_patch.v0_3``): ``--module torchtitan_patch.v0_3 --config
  llama3_debug_paro`` (or a config function of your own that returns a
  :class:`torchtitan_patch.v0_3.ParoTrainer.Config`); importing this package installs nothing.

``python -m torchtitan_patch.train`` is torchtitan's train script for either release, plus CPU
mode. The adapter follows the installed torchtitan (:mod:`torchtitan_patch.version`); another
release stops at import with an error naming the supported ones.
"""

from torchtitan_patch.version import adapter, torchtitan_version

if torchtitan_version() and adapter() == "v0_2":
    from torchtitan_patch.v0_2 import install

    install()
