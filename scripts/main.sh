#!/usr/bin/env bash
# The main job: train torchtitan's llama3 debug model with PaRO IIG + HO-Ring on 4 ranks
# (2 groups x 2 ranks), on CPU with gloo when no GPU is present, offline. About 20 steps with
# gradient accumulation; the loss goes from about 8 to about 2. Set-up included: creates .venv
# (scripts/setup.sh pins torch==2.13.0 before anything else is installed).
#
#   bash scripts/main.sh                                  # PaRO IIG, HO-Ring
#   bash scripts/main.sh --parallelism.paro_strategy NIG  # any torchtitan override
#   bash scripts/main.sh --parallelism.paro_strategy None # stock torchtitan HSDP, same layout
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
# Console output of rank 0 only (torchtitan logs on every rank).
exec .venv/bin/torchrun --standalone --nproc-per-node 4 --local-ranks-filter 0 --role rank --tee 3 \
  -m torchtitan_patch.train \
  --job.config_file train_configs/llama3_debug_paro.toml "$@"
