#!/usr/bin/env bash
# GPU check: run paro-fsdp's CUDA tests (tests/test_cuda.py) on a machine with a CUDA GPU and
# exit non-zero if any fails, or if torch sees no CUDA GPU (the tests would only skip).
#
#   bash scripts/setup.sh && bash scripts/gpu_check.sh          # a machine with internet
#   bash scripts/setup.sh --stack torchtitan-0.3 && bash scripts/gpu_check.sh --stack torchtitan-0.3
#   PYTHON=/path/to/python bash scripts/gpu_check.sh            # torch, torchtitan already installed
#   bash scripts/gpu_check.sh -k stream -x                      # extra arguments go to pytest
#
# torch: scripts/setup.sh pins torch==2.13.0; with internet on a Linux x86_64 GPU machine pip
# resolves that pin to PyPI's default wheel, which is the CUDA build. Without internet, point
# PYTHON at an interpreter that already has torch 2.11-2.13 (CUDA), torchtitan 0.2.2 and pytest;
# paro-fsdp itself need not be installed (the repository root goes on PYTHONPATH).
#
# What runs (details in docs/gpu-check.md): one NCCL rank end to end (engine, optimizer,
# clipping, DCP checkpoint, probe and object collectives on an NCCL-only process group), the
# single-rank `paro probe` refusal, torchtitan's debug model on one GPU with paro_strategy set
# (fp32, and the shipped GPU configs' bf16 + activation checkpointing + compile) and with auto,
# and several ranks in one process on the GPU (HO-Ring, the engine bit for bit,
# the probe, auto, and the stream-safety test with collectives delayed on their streams).
set -uo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
if [ "${1:-}" = "--stack" ]; then
  case "${2:-}" in
    torchtitan-0.2.2) VENV=.venv ;;
    torchtitan-0.3) VENV=.venv-torchtitan-0.3 ;;  # torch 2.15.0 + torchtitan 0.3.0
    *) echo "gpu_check: --stack ${2:-} is not a stack; valid: torchtitan-0.2.2, torchtitan-0.3" >&2; exit 2 ;;
  esac
  shift 2
fi
PYTHON=${PYTHON:-$VENV/bin/python}
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "gpu_check: $PYTHON not found; using python3" >&2
  PYTHON=python3
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== GPU"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv || true
  nvidia-smi || true
else
  echo "nvidia-smi not found"
fi

echo "== Python and torch ($PYTHON)"
"$PYTHON" - <<'EOF' || { echo "gpu_check: torch is not importable with $PYTHON" >&2; exit 2; }
import platform
import torch
print(f"python {platform.python_version()}  torch {torch.__version__}  CUDA build {torch.version.cuda}")
if torch.cuda.is_available():
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else "?"
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {p.name}  {p.total_memory / 2**30:.1f} GiB  sm_{p.major}{p.minor}")
    print(f"NCCL {nccl}")
else:
    print("torch sees no CUDA GPU")
try:
    import torchtitan, importlib.metadata as md
    print(f"torchtitan {md.version('torchtitan')}")
except Exception as e:  # noqa: BLE001 - reported, the tests that need it fail with the reason
    print(f"torchtitan not importable: {e}")
EOF

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: FAILED: torch $("$PYTHON" -c 'import torch; print(torch.__version__)') sees no CUDA GPU" \
       "(a CPU-only wheel, or no driver); the CUDA tests cannot run here" >&2
  exit 3
fi
if ! "$PYTHON" -c "import pytest, paro_fsdp, torchtitan_patch" 2>/dev/null; then
  echo "gpu_check: FAILED: pytest, paro_fsdp or torchtitan_patch is not importable with $PYTHON" \
       "(bash scripts/setup.sh installs them)" >&2
  exit 4
fi

echo "== tests/test_cuda.py"
# PARO_REQUIRE_CUDA=1 turns a missing GPU into a failing test instead of skips.
PARO_REQUIRE_CUDA=1 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py "$@"
status=$?
if [ "$status" -eq 0 ]; then
  echo "gpu_check: PASSED"
else
  echo "gpu_check: FAILED (pytest exit status $status)" >&2
fi
exit "$status"
