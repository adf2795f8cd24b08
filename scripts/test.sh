#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite on CPU with gloo, for one tested stack.
#
#   bash scripts/test.sh                          # torch 2.13.0 + torchtitan 0.2.2: the whole suite
#   bash scripts/test.sh --stack torchtitan-0.3   # torch 2.15.0 + torchtitan 0.3.0: library suite + 0.3 tests
#   bash scripts/test.sh --stack torch-2.14       # torch 2.14.1: the library suite (no torchtitan)
#   bash scripts/test.sh -k engine -x             # other arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
STACK=()
if [ "${1:-}" = "--stack" ]; then
  STACK=(--stack "${2:?--stack needs a value}")
  shift 2
fi
VENV=$(bash scripts/setup.sh "${STACK[@]}" | tail -n 1)
exec "$VENV/bin/python" -m pytest -q -rs "$@"
