"""The torchtitan 0.3 train script behind ``python -m torchtitan_patch.train``.

Same command line as ``python -m torchtitan.train`` (``--module`` / ``--config`` and
overrides). Without an accelerator it first applies CPU mode (:mod:`torchtitan_patch.v0_3.cpu`). The
config is parsed once before torchtitan's ``main`` parses it again, so a wrong PaRO field
stops the launch before any process group exists.
"""

from __future__ import annotations

import os
import sys

from torchtitan_patch.cpu import accelerator_available, enable_cpu_mode


def _validate_early(args: list[str]) -> None:
    """Fail on invalid PaRO fields now, with the launcher's world size, before rendezvous."""
    from torchtitan.config import ConfigManager

    from torchtitan_patch.settings import paro_settings
    from torchtitan_patch.v0_3.config import check_release_fields, job_view

    config = ConfigManager().parse_args(args)
    if getattr(config.parallelism, "paro_strategy", None) is None:
        return
    if paro_settings(job_view(config), int(os.environ.get("WORLD_SIZE", "1"))) is not None:
        check_release_fields(config)


def main() -> None:
    if not accelerator_available():
        enable_cpu_mode()
    from torchtitan.tools.logging import init_logger
    from torchtitan.train import main as torchtitan_main

    init_logger()
    _validate_early(sys.argv[1:])
    torchtitan_main()


if __name__ == "__main__":
    main()
