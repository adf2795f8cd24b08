"""Worker of ``benchmarks.planner_validation``: train one small model under every strategy.

Runs inside each torchrun rank on the emulated cluster. Strategies are measured in rounds
(every strategy once per round, in a rotated order), so slow drift of the shared machine hits
all of them alike. Rank 0 writes the results as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh

from paro_fsdp import ParoOptimizer, ParoStrategy, comm_stats, paro_parallelize
from paro_fsdp.comm.groups import REPLICATE_DIM, SHARD_DIM
from paro_fsdp.planner import sizes_from_model


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.lin(x))


class WideNet(nn.Module):
    """Wide linear blocks on a small batch: many bytes to move, little arithmetic."""

    def __init__(self, dim: int, depth: int) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.layers = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _batch(dim: int, batch: int, step: int, micro: int, rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(10_000 * step + 100 * micro + rank)
    return torch.randn(batch, dim, generator=gen)


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _micro_steps(model: nn.Module, args: argparse.Namespace, step: int, rank: int, paro: bool) -> None:
    for a in range(args.accum):
        if paro:
            model.set_requires_gradient_sync(a == args.accum - 1)
        model(_batch(args.dim, args.batch, step, a, rank)).square().mean().div(args.accum).backward()


def _measure_compute(args: argparse.Namespace, rank: int) -> list[float]:
    """Forward and backward of A micro-steps on a local unsharded copy, all ranks at once."""
    torch.manual_seed(0)
    model = WideNet(args.dim, args.depth)
    times = []
    for step in range(args.warmup + args.steps):
        dist.barrier()
        start = time.perf_counter()
        _micro_steps(model, args, step, rank, paro=False)
        times.append(_slowest(time.perf_counter() - start))
        model.zero_grad(set_to_none=True)
    return times[args.warmup:]


def _measure_strategy(code: str, mesh, args: argparse.Namespace, rank: int) -> tuple[list[float], dict]:
    torch.manual_seed(0)
    model = WideNet(args.dim, args.depth)
    model = paro_parallelize(model, mesh, code, blocks=list(model.layers), comm=args.comm)
    opt = ParoOptimizer(model, torch.optim.AdamW, lr=1e-3)
    times = []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            comm_stats(model).reset()
        dist.barrier()
        start = time.perf_counter()
        _micro_steps(model, args, step, rank, paro=True)
        opt.step()
        opt.zero_grad()
        times.append(_slowest(time.perf_counter() - start))
    sent = {phase: {link: v / args.steps for link, v in links.items()}
            for phase, links in comm_stats(model).as_dict().items()}
    del model, opt
    gc.collect()
    return times[args.warmup:], sent


def run_worker(args: argparse.Namespace) -> int:
    world, m = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_WORLD_SIZE"])
    mesh = init_device_mesh("cpu", (world // m, m), mesh_dim_names=(REPLICATE_DIM, SHARD_DIM))
    rank = dist.get_rank()
    codes = [s.code for s in ParoStrategy.all_valid()]
    step_times: dict[str, list[float]] = {c: [] for c in codes}
    compute: list[float] = []
    sent: dict[str, dict] = {}
    for r in range(args.rounds):
        compute += _measure_compute(args, rank)
        order = codes[r % len(codes):] + codes[:r % len(codes)]
        for code in order:
            times, sent[code] = _measure_strategy(code, mesh, args, rank)
            step_times[code] += times
            if rank == 0:
                print(f"round {r + 1}/{args.rounds} {code}: median {statistics.median(times):.3f} s", flush=True)
    if rank == 0:
        sizes = sizes_from_model(WideNet(args.dim, args.depth))
        Path(args.results).write_text(json.dumps({
            "step_times": step_times, "compute_times": compute, "bytes_sent_rank0": sent,
            "model": {"params": sizes.params, "blocks": sizes.blocks, "block_params": sizes.block_params},
        }))
    dist.destroy_process_group()
    return 0
