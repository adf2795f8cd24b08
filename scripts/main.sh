#!/usr/bin/env bash
# The main job: train torchtitan's llama3 debug model with PaRO IIG + HO-Ring on 4 ranks
# (2 groups x 2 ranks), on CPU with gloo when no GPU is present, offline. About 20 steps with
# gradient accumulation; the loss goes from about 8 to about 2. Set-up included: the stack's
# virtual environment (scripts/setup.sh pins torch before anything else is installed).
#
#   bash scripts/main.sh                                  # torchtitan 0.2.2, its TOML: PaRO IIG, HO-Ring
#   bash scripts/main.sh --torchtitan 0.3                 # the same job on torchtitan 0.3 (config function)
#   bash scripts/main.sh --parallelism.paro_strategy NIG  # any torchtitan override, on either release
#   bash scripts/main.sh --parallelism.paro_strategy None # stock torchtitan HSDP, same layout
set -euo pipefail
cd "$(dirname "$0")/.."
RELEASE=0.2.2
if [ "${1:-}" = "--torchtitan" ]; then
  RELEASE="${2:?--torchtitan needs a value: 0.2.2 or 0.3}"
  shift 2
fi
case "$RELEASE" in
  0.2.2) VENV=$(bash scripts/setup.sh | tail -n 1)
         JOB=(--job.config_file train_configs/llama3_debug_paro.toml) ;;
  0.3|0.3.0) VENV=$(bash scripts/setup.sh --stack torchtitan-0.3 | tail -n 1)
         JOB=(--module torchtitan_patch.v0_3 --config llama3_debug_paro) ;;
  *) echo "main.sh: --torchtitan $RELEASE is not supported; valid: 0.2.2, 0.3" >&2; exit 2 ;;
esac
# Console output of rank 0 only (torchtitan logs on every rank).
exec "$VENV/bin/torchrun" --standalone --nproc-per-node 4 --local-ranks-filter 0 --role rank --tee 3 \
  -m torchtitan_patch.train "${JOB[@]}" "$@"
