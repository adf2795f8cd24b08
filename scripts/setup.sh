#!/usr/bin/env bash
# Create a virtual environment (if needed) and install paro-fsdp with one tested stack's pinned
# dependencies. torch is installed first, pinned, so that nothing later pulls another build.
#
#   bash scripts/setup.sh                        # .venv: torch 2.13.0 (CPU wheel) + torchtitan 0.2.2
#   bash scripts/setup.sh --stack torch-2.14     # .venv-torch-2.14: torch 2.14.1, the library alone
#
# Prints the environment's path on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
STACK=torchtitan-0.2.2
if [ "${1:-}" = "--stack" ]; then
  STACK="${2:?--stack needs a value: torchtitan-0.2.2 or torch-2.14}"
fi
case "$STACK" in
  torchtitan-0.2.2) VENV=.venv; TORCH=2.13.0; EXTRAS="torchtitan,test" ;;
  torch-2.14) VENV=.venv-torch-2.14; TORCH=2.14.1; EXTRAS="test" ;;  # PyPI's build: CUDA, about 5.5 GB
  *) echo "setup.sh: unknown --stack '$STACK'; valid: torchtitan-0.2.2, torch-2.14" >&2; exit 2 ;;
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
