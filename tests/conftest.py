"""Collection per stack.

The library-only stack (``bash scripts/test.sh --stack torch-2.14``: paro-fsdp without
torchtitan) does not collect the files that drive torchtitan, and says which at the end of the
run; tests inside library files that need torchtitan skip with that reason. With torchtitan
installed everything is collected.
"""

from __future__ import annotations

import importlib.util

import pytest

HAS_TORCHTITAN = importlib.util.find_spec("torchtitan") is not None
# Files that import torchtitan (or torchtitan_patch, or the benchmarks built on it) at module level.
TORCHTITAN_FILES = [
    "test_bad_input.py",
    "test_checkpoint_integrity.py",
    "test_e2e_report.py",
    "test_initial_weights.py",
    "test_recovery.py",
    "test_shipped_configs.py",
    "test_torchtitan_config.py",
    "test_torchtitan_distributed.py",
    "test_torchtitan_features.py",
]
collect_ignore = [] if HAS_TORCHTITAN else TORCHTITAN_FILES
needs_torchtitan = pytest.mark.skipif(not HAS_TORCHTITAN, reason="torchtitan is not installed (library-only stack)")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not HAS_TORCHTITAN:
        terminalreporter.write_line("torchtitan is not installed: the library suite only; not collected: "
                                    + ", ".join(TORCHTITAN_FILES))
