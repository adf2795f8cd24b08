"""``python -m torchtitan_patch.train``: torchtitan's train script, also on machines without an accelerator.

Same command line as ``python -m torchtitan.train`` of the installed torchtitan: a job TOML
(``--job.config_file``) on 0.2.2, ``--module`` / ``--config`` on 0.3. With an accelerator it
is that script; without one, the adapter's CPU mode runs it on CPU with gloo. PaRO settings
are validated before any process group is created.
"""

from __future__ import annotations

import importlib

from torchtitan_patch.version import adapter


def main() -> None:
    importlib.import_module(f"torchtitan_patch.{adapter()}.train").main()


if __name__ == "__main__":
    main()
