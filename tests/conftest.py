"""Collection per stack.

Files that drive torchtitan are collected where the torchtitan they are written for is
installed: :data:`TORCHTITAN_FILES` names, for each, the releases it runs on. The library-only
stack (``bash scripts/test.sh --stack torch-2.14``) collects none of them, and the torchtitan 0.3
stack those written for 0.3 as well; the run says at its end which files it did not collect and
why. Tests inside library files that need torchtitan 0.2.2 skip with that reason.
"""

from __future__ import annotations

import importlib.util
from importlib.metadata import version

import pytest

INSTALLED = version("torchtitan") if importlib.util.find_spec("torchtitan") is not None else None
HAS_TORCHTITAN = INSTALLED is not None
BOTH = ("0.2.2", "0.3.0")
V022 = ("0.2.2",)
# Files that import torchtitan (or torchtitan_patch, or the benchmarks built on it) at module
# level, and the torchtitan releases each is written for.
TORCHTITAN_FILES = {
    "test_bad_input.py": V022,
    "test_checkpoint_integrity.py": V022,
    "test_e2e_report.py": V022,
    "test_initial_weights.py": V022,
    "test_recovery.py": BOTH,
    "test_shipped_configs.py": V022,
    "test_torchtitan_config.py": V022,
    "test_torchtitan_distributed.py": BOTH,
    "test_torchtitan_features.py": V022,
    "test_torchtitan_v0_3.py": ("0.3.0",),
}
collect_ignore = [name for name, releases in TORCHTITAN_FILES.items() if INSTALLED not in releases]
needs_any_torchtitan = pytest.mark.skipif(not HAS_TORCHTITAN, reason="torchtitan is not installed (library-only stack)")
needs_torchtitan = pytest.mark.skipif(
    INSTALLED != "0.2.2",
    reason=f"written for torchtitan 0.2.2's TOML job files; installed: {INSTALLED or 'no torchtitan'}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if collect_ignore:
        found = f"torchtitan {INSTALLED} is installed" if HAS_TORCHTITAN else "torchtitan is not installed"
        terminalreporter.write_line(
            f"{found}: not collected (written for another torchtitan release): " + ", ".join(collect_ignore))
