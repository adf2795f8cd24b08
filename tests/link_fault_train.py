"""A tiny PaRO training run for link faults on the emulated cluster (started by torchrun per node).

``python -m paro_fsdp.cluster --nodes 2 --ranks-per-node 2 -- tests/link_fault_train.py --steps 12``

The library loop (``paro_parallelize`` + ``ParoOptimizer`` on ``tests/models.py``'s ``Net``,
2 micro-batches per step) on the (nodes, ranks per node) mesh. Process groups start with
``--init-timeout``; after a warm-up step every group gets ``--timeout`` (as torchtitan does
after its first step; a comma-separated list gives each pass its own). Each rank prints, one
line at a time:

- ``ready pass=<p> rank=<r> timeout=<s> wall=<time.time()>`` once the pass's timeout is in force;
- ``pass=<p> step=<s> rank=<r> loss=<float.hex> wall=<time>`` after each step; ``--passes 2``
  trains twice, each pass a fresh model and optimizer from the same seed on the same data (the
  first pass is the uninterrupted reference for a fault that strikes the second);
- ``COLLECTIVE_ERROR rank=<r> wall=<time> collective=<c> purpose=<p> phase=<ph> link=<l>
  ranks=<a,b> reason=<why> elapsed=<s> timeout=<s>`` when a collective fails, after which the
  error propagates (traceback, non-zero exit);
- ``done rank=<r>`` at the end, and ``exit rank=<r> wall=<time>`` as the interpreter exits.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from models import Net, batch, loss_fn  # noqa: E402

from paro_fsdp import ParoOptimizer, paro_parallelize  # noqa: E402
from paro_fsdp.comm.errors import CollectiveError, set_collective_timeout  # noqa: E402


def say(line: str) -> None:
    print(line + "\n", end="", flush=True)  # one write per line: ranks of a node do not interleave


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--passes", type=int, default=1)
    p.add_argument("--strategy", default="IIG")
    p.add_argument("--comm", default="default")
    p.add_argument("--timeout", default="30", help="collective timeout after warm-up, seconds (per pass: a,b,...)")
    p.add_argument("--init-timeout", type=float, default=300.0, help="timeout during start-up and warm-up")
    p.add_argument("--step-sleep", type=float, default=0.0, help="pause after each step (paces the run)")
    p.add_argument("--dim", type=int, default=32)
    args = p.parse_args()
    timeouts = [float(t) for t in args.timeout.split(",")]

    dist.init_process_group("gloo", timeout=timedelta(seconds=args.init_timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    atexit.register(lambda: say(f"exit rank={rank} wall={time.time():.3f}"))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    mesh = init_device_mesh("cpu", (world // per_node, per_node), mesh_dim_names=("dp_replicate", "dp_shard"))

    def build() -> tuple[torch.nn.Module, ParoOptimizer]:
        torch.manual_seed(0)
        model = Net(dim=args.dim, depth=2)
        model = paro_parallelize(model, mesh, args.strategy, blocks=list(model.layers), comm=args.comm)
        return model, ParoOptimizer(model, torch.optim.AdamW, lr=1e-2)

    def train_step(model: torch.nn.Module, optim: ParoOptimizer, step: int) -> float:
        total = 0.0
        for micro in range(2):
            model.set_requires_gradient_sync(micro == 1)
            loss = loss_fn(model, batch(step, micro, rank)) / 2
            loss.backward()
            total += loss.item()
        optim.step()
        optim.zero_grad()
        return total

    for run in range(1, args.passes + 1):
        model, optim = build()
        train_step(model, optim, 0)  # warm-up (under the start-up timeout in the first pass)
        timeout = timeouts[min(run, len(timeouts)) - 1]
        dist.barrier()  # every rank is past the warm-up before any meets the shorter timeout
        set_collective_timeout(timeout)
        say(f"ready pass={run} rank={rank} timeout={timeout:g} wall={time.time():.3f}")
        for step in range(1, args.steps + 1):
            loss = train_step(model, optim, step)
            say(f"pass={run} step={step} rank={rank} loss={loss.hex()} wall={time.time():.3f}")
            if args.step_sleep:
                time.sleep(args.step_sleep)
    dist.barrier()
    say(f"done rank={rank}")
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except CollectiveError as e:
        say(f"COLLECTIVE_ERROR rank={e.rank} wall={time.time():.3f} collective={e.collective} "
            f"purpose={e.purpose} phase={e.phase} link={e.link} ranks={','.join(map(str, e.ranks))} "
            f"reason={e.reason} elapsed={e.elapsed_s:.2f} timeout={e.timeout_s} | {e}")
        raise
