#!/usr/bin/env bash
# Create a virtual environment (if needed) and install paro-fsdp with one tested stack's pinned
# dependencies. torch is installed first, pinned, so that nothing later pulls another build.
#
#   bash scripts/setup.sh                            # .venv: torch 2.13.0 (CPU wheel) + torchtitan 0.2.2
#   bash scripts/setup.sh --stack torchtitan-0.3     # .venv-torchtitan-0.3: torch 2.15.0 + torchtitan 0.3.0
#   bash scripts/setup.sh --stack torch-2.14         # .venv-torch-2.14: torch 2.14.1, the library alone
#
# torch 2.14.1 and 2.15.0 come from PyPI as CUDA builds (about 5.5 GB installed; they run on CPU
# too). Some machines cap pip at torch 2.14.1 through their pip configuration; the 2.15.0 stack
# installs without it (PIP_CONFIG_FILE=/dev/null), from PyPI.
#
# Prints the environment's path on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
STACK=torchtitan-0.2.2
if [ "${1:-}" = "--stack" ]; then
  STACK="${2:?--stack needs a value: torchtitan-0.2.2, torchtitan-0.3 or torch-2.14}"
fi
case "$STACK" in
  torchtitan-0.2.2) VENV=.venv; TORCH=2.13.0; EXTRAS="torchtitan,test" ;;
  torchtitan-0.3) VENV=.venv-torchtitan-0.3; TORCH=2.15.0; EXTRAS="torchtitan03,test"; export PIP_CONFIG_FILE=/dev/null ;;
  torch-2.14) VENV=.venv-torch-2.14; TORCH=2.14.1; EXTRAS="test" ;;
  *) echo "setup.sh: unknown --stack '$STACK'; valid: torchtitan-0.2.2, torchtitan-0.3, torch-2.14" >&2; exit 2 ;;
esac
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
"$VENV/bin/python" -m pip install --quiet "torch==$TORCH" >&2
"$VENV/bin/python" -m pip install --quiet -e ".[$EXTRAS]" >&2
echo "$VENV"
