#!/usr/bin/env bash
# The paper's qualitative findings, reproduced with `paro plan` (8 GPUs per node, 150 GB/s
# intra and 200 Gbit/s per node inter, bf16 parameters and gradients, K = 12, A = 4, 20 GiB of
# activations). Prints the five best strategies and GGG (ZeRO-3) for each case.
set -euo pipefail
common=(--ranks-per-node 8 --intra-bw 150 --inter-bw 3.125 --intra-latency 20 --inter-latency 50
        --accum 4 --activation-memory 20 --param-bytes 2 --grad-bytes 2 --optim-bytes 12)
run() {
  echo "## $1"
  shift
  paro plan "${common[@]}" "$@" | grep -E '^ *(rank|[1-5]) |GGG|^best' | cut -c1-200
  echo
}
for comm in default ho_ring; do
  run "65B full training, 16 nodes, 80 GiB, comm=$comm" --params 65B --blocks 80 --nodes 16 --memory 80 --comm $comm
  run "7B full training, 4 nodes, 40 GiB, comm=$comm" --params 7B --blocks 32 --nodes 4 --memory 40 --comm $comm
  run "65B PEFT, trainable Psi/16, 16 nodes, 80 GiB, comm=$comm" --params 65B --trainable 1/16 --blocks 80 --nodes 16 --memory 80 --comm $comm
  run "65B PEFT, trainable 3/1000, 16 nodes, 80 GiB, comm=$comm" --params 65B --trainable 3/1000 --blocks 80 --nodes 16 --memory 80 --comm $comm
done
