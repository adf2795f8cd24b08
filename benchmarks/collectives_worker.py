"""The per-rank side of ``benchmarks.collectives``: runs under torchrun on the emulated cluster.

Every case (collective, size) runs each implementation once per repetition, in an order rotated
between repetitions, so that load from other processes spreads over all of them. Around every
operation the ranks meet on a separate gloo group; the first rank of each node reads its
node's interface counters there, so the bytes are those of this operation alone (plus a
barrier's few hundred bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from benchmarks.baselines import BackendCollectives, FlatRingCollectives
from benchmarks.collectives_report import BACKEND_FLAT, FLAT_RING, HIERARCHICAL
from paro_fsdp.cluster import node_counters
from paro_fsdp.comm.groups import REPLICATE_DIM, SHARD_DIM, MeshGroups
from paro_fsdp.comm.hierarchical import HierarchicalCollectives
from paro_fsdp.comm.ho_ring import HORingCollectives
from paro_fsdp.comm.registry import HO_RING
from paro_fsdp.comm.stats import INTER, INTRA

MIB = 1 << 20
PHASES = {"inter_phase": INTER, "intra_phase": INTRA}


class _Phase:
    """One link's part of the hierarchical collectives alone, to profile where their time goes.

    Same buffers and link collectives as ``HierarchicalCollectives``, without the other link's
    (so the result is not the collective's): HO-Ring can at best take the longer of the two.
    """

    def __init__(self, groups: MeshGroups, link: str) -> None:
        self.groups, self.link = groups, link

    def all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        column = input.new_empty(self.groups.groups * input.numel())
        if self.link == INTER:
            self.groups.all_gather(column, input, INTER)
        else:
            self.groups.all_gather(output, column, INTRA)

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor) -> None:
        column = input[: self.groups.groups * output.numel()]
        if self.link == INTER:
            self.groups.reduce_scatter(output, column, INTER)
        else:
            self.groups.reduce_scatter(column.clone(), input, INTRA)

    def all_reduce(self, tensor: torch.Tensor) -> None:
        piece = tensor[: tensor.numel() // self.groups.group_size]
        if self.link == INTER:
            self.groups.all_reduce(piece, INTER)
        else:
            self.groups.reduce_scatter(piece.clone(), tensor, INTRA)
            self.groups.all_gather(tensor, piece.clone(), INTRA)


def _implementations(names: list[str], groups: MeshGroups, chunks: list[int]) -> dict[str, object]:
    impls: dict[str, object] = {}
    for name in names:
        if name == BACKEND_FLAT:
            impls[name] = BackendCollectives()
        elif name == FLAT_RING:
            impls[name] = FlatRingCollectives()
        elif name == HIERARCHICAL:
            impls[name] = HierarchicalCollectives(groups)
        elif name == HO_RING:
            if len(chunks) > 1:
                for depth in chunks:
                    impls[f"{name}(c={depth})"] = HORingCollectives(groups, chunks=depth)
            else:
                impls[name] = HORingCollectives(groups, **({"chunks": chunks[0]} if chunks else {}))
        elif name in PHASES:
            impls[name] = _Phase(groups, PHASES[name])
    return impls


class _Case:
    """Buffers of one collective of ``size`` bytes (the full tensor), refilled before every run.

    Fill patterns make every block distinct, so a result in the wrong rank order fails ``check``.
    """

    def __init__(self, collective: str, size: int, rank: int, world: int, device: torch.device) -> None:
        self.collective, self.rank, self.world = collective, rank, world
        numel = size // 4
        if numel % world:
            raise ValueError(f"size {size} B is not a multiple of 4 * world size {world}")
        self.block = numel // world
        full = torch.empty(numel, device=device)
        piece = torch.empty(self.block, device=device)
        self.input, self.output = {
            "all_gather": (piece, full), "reduce_scatter": (full, piece), "all_reduce": (full, full),
        }[collective]
        self._block_ids = torch.arange(world, device=device, dtype=torch.float32).repeat_interleave(self.block)

    def refill(self) -> None:
        if self.collective == "all_gather":
            self.input.fill_(self.rank + 1)
        elif self.collective == "reduce_scatter":
            torch.add(self._block_ids * self.world, self.rank + 1, out=self.input)
        else:
            self.input.fill_(self.rank + 1)

    def run(self, impl: object) -> None:
        if self.collective == "all_reduce":
            impl.all_reduce(self.input)
        else:
            getattr(impl, self.collective)(self.output, self.input)

    def check(self, name: str) -> None:
        n = self.world
        if self.collective == "all_gather":
            expected = self._block_ids + 1
        elif self.collective == "reduce_scatter":
            expected = torch.full_like(self.output, n * n * self.rank + n * (n + 1) / 2)
        else:
            expected = torch.full_like(self.output, n * (n + 1) / 2)
        if not torch.equal(self.output, expected):
            bad = (self.output != expected).nonzero()[0].item()
            raise RuntimeError(f"{name} {self.collective}: wrong result on rank {self.rank} at element {bad}: "
                               f"{self.output[bad].item()} != {expected[bad].item()}")


def run_worker(args: argparse.Namespace) -> int:
    if torch.cuda.is_available():
        device_type = "cuda"
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        device_type = "cpu"
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    m = int(os.environ["LOCAL_WORLD_SIZE"])
    g = world // m
    node = int(os.environ["PARO_CLUSTER_NODE"])
    if node != rank // m:
        raise RuntimeError(f"rank {rank} runs on node {node}, expected node {rank // m}: ranks are not group-major")
    mesh = init_device_mesh(device_type, (g, m), mesh_dim_names=(REPLICATE_DIM, SHARD_DIM))
    groups = MeshGroups(mesh)
    meta = dist.new_group(backend="gloo")
    impls = _implementations(args.impls, groups, args.chunks)
    device = groups.device
    reads_counters = int(os.environ["LOCAL_RANK"]) == 0

    def sample(case: _Case, impl: object) -> tuple[float, list[float]]:
        case.refill()
        dist.barrier(group=meta)
        before = node_counters() if reads_counters else None
        dist.barrier(group=meta)
        start = time.perf_counter()
        case.run(impl)
        if device.type != "cpu":
            torch.get_device_module(device.type).synchronize()
        elapsed = time.perf_counter() - start
        dist.barrier(group=meta)
        delta = node_counters() - before if reads_counters else None
        counts = (delta.tx, delta.rx, delta.loopback) if delta else (0, 0, 0)
        mine = torch.tensor([elapsed, *counts], dtype=torch.float64)
        everyone = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(everyone, mine, group=meta)
        per_node = [everyone[i * m][1:].tolist() for i in range(g)]
        return max(t[0].item() for t in everyone), per_node

    cases = []
    for collective in args.collectives:
        for size_mib in args.sizes:
            case = _Case(collective, size_mib * MIB, rank, world, device)
            samples: dict[str, list] = {name: [] for name in impls}
            names = list(impls)
            for rep in range(args.warmup + args.reps):
                for name in names[rep % len(names):] + names[: rep % len(names)]:
                    seconds, per_node = sample(case, impls[name])
                    if rep < args.warmup:
                        if name not in PHASES:  # a phase alone computes no result
                            case.check(name)
                    else:
                        samples[name].append({"seconds": seconds, "nodes": per_node})
            del case
            for name, runs in samples.items():
                cases.append({"collective": collective, "size": size_mib * MIB, "impl": name, "runs": runs})
                if rank == 0:
                    median = statistics.median(r["seconds"] for r in runs)
                    tx = statistics.mean(sum(n[0] for n in r["nodes"]) / g for r in runs)
                    print(f"{collective:>14} {size_mib:>4} MiB {name:>12}: {median:7.3f} s, "
                          f"link tx {tx / MIB:7.2f} MiB/node", flush=True)
    if rank == 0:
        args.results.write_text(json.dumps({"backend": dist.get_backend(groups.inter), "cases": cases}))
    dist.destroy_process_group()
    return 0
