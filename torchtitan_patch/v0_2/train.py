"""The torchtitan 0.2.2 train script behind ``python -m torchtitan_patch.train``.

Same command line as ``python -m torchtitan.train``. With an accelerator it is exactly that;
without one it first applies :mod:`torchtitan_patch.cpu` so the trainer runs on CPU with gloo.
PaRO settings are validated before any process group is created.
"""

from __future__ import annotations

import os
import sys

from torchtitan_patch.cpu import accelerator_available, enable_cpu_mode


def _validate_early(args: list[str]) -> None:
    """Fail on invalid PaRO fields now, with the launcher's world size, before rendezvous."""
    from torchtitan.config import ConfigManager

    from torchtitan_patch.settings import paro_settings

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    paro_settings(ConfigManager().parse_args(args), world_size)


def main() -> None:
    if not accelerator_available():
        enable_cpu_mode()
    from torchtitan.tools.logging import init_logger
    from torchtitan.train import Trainer
    from torchtitan.train import main as torchtitan_main

    init_logger()
    _validate_early(sys.argv[1:])
    torchtitan_main(Trainer)


if __name__ == "__main__":
    main()
