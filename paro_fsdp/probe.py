"""``paro probe``: measure each link's latency and bandwidth with short collectives on the 2D mesh.

Every rank runs each collective kind training uses (all-gather, reduce-scatter, all-reduce) over
its intra group (all groups at once), then over its inter group (all columns at once), at a few
sizes: the same concurrency training has, so a NIC shared by the ranks of a node shows up as its
per-rank share. Kinds are measured apart because backends do not run them at the same rate
(gloo's reduce-scatter is an all-to-all that moves its bytes at about half the all-gather rate).
Each sample times a few collectives back to back, as training issues them (one per FSDP unit):
a lone collective after an idle pause can ride a link's burst allowance and look faster than
sustained traffic. Times are the slowest rank's, the median of several samples; a line
``latency + bytes_sent_per_rank / bandwidth`` is fitted per kind and link.

Where both links have more than one rank, the global all-gather and reduce-scatter are then
timed with the two-phase collectives and with HO-Ring at two pipeline depths, at the size where
the deeper one cuts chunks of HO-Ring's minimum: what cutting a collective costs beyond the
overlap it buys (copies, per-call overheads, or a slow link kept busier) is measured rather
than assumed, and the planner chooses between the collectives and HO-Ring's depth with it.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from paro_fsdp.comm.device import barrier, collective_device
from paro_fsdp.comm.groups import REPLICATE_DIM, SHARD_DIM, MeshGroups
from paro_fsdp.comm.hierarchical import HierarchicalCollectives
from paro_fsdp.comm.ho_ring import DEFAULT_MIN_CHUNK_BYTES, HO_RING_DEPTHS, HORingCollectives
from paro_fsdp.comm.quant import DEFAULT_BLOCK_SIZE, INT8, dequantize, quantize
from paro_fsdp.comm.stats import INTER, INTRA, LINKS
from paro_fsdp.planner.calibration import Calibration, LinkFit, fit_ho_ring_cost, fit_link, write_calibration
from paro_fsdp.planner.inputs import COLLECTIVE_KINDS, HORingCost

ADAPTIVE_SIZES = tuple(64 * 2**10 * 8**i for i in range(4))  # bytes per rank: 64 KiB .. 32 MiB
BANDWIDTH_BOUND = 4.0
BACK_TO_BACK = 4
CHUNK_DEPTHS = (min(HO_RING_DEPTHS), max(HO_RING_DEPTHS))  # the range the planner chooses HO-Ring's depth in
CHUNKED_KINDS = ("all_gather", "reduce_scatter")  # HO-Ring's collectives in FSDP2's gathers and reductions


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds ``fn`` takes on the slowest rank, all ranks starting together.

    The barrier and the reduction of the times run on the default group (every rank probes
    at once, so every rank stops at the same size), with tensors on that group's device: an
    NCCL-only job, as torchtitan launches one, has no CPU backend.
    """
    barrier()
    start = time.perf_counter()
    fn()
    if device.type != "cpu":
        torch.accelerator.synchronize()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=collective_device())
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # tiny, uncounted
    return float(elapsed.item())


def _collective(groups: MeshGroups, kind: str, link: str, size: int) -> Callable[[], None]:
    """One ``kind`` collective over ``link`` in which each rank contributes ``size`` bytes."""
    k = groups.size(link)
    shard = torch.ones(max(1, size // 4), dtype=torch.float32, device=groups.device)
    full = shard.new_ones(k * shard.numel())
    if kind == "all_gather":
        return lambda: groups.all_gather(full, shard, link)
    if kind == "reduce_scatter":
        return lambda: groups.reduce_scatter(shard, full, link)
    return lambda: groups.all_reduce(shard, link)


def _median_seconds(groups: MeshGroups, kind: str, link: str, size: int, repeats: int,
                    warmup: int) -> tuple[float, float]:
    """(bytes sent per rank, median seconds) of one collective, timed back to back."""
    op = _collective(groups, kind, link, size)

    def burst() -> None:
        for _ in range(BACK_TO_BACK):
            op()

    groups.stats.reset()
    times = [_timed(burst, groups.device) / BACK_TO_BACK for _ in range(warmup + repeats)][warmup:]
    return groups.stats.get(link=link) / ((warmup + repeats) * BACK_TO_BACK), statistics.median(times)


def measure(groups: MeshGroups, sizes: tuple[int, ...] | None = None, repeats: int = 3,
            warmup: int = 1) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """``{kind: {link: [(bytes sent per rank, median seconds), ...]}}`` for links whose groups have > 1 rank.

    Bytes are what the counted collectives record, the same measure the formulas use. Without
    ``sizes``, sizes grow 8x from 64 KiB until a collective takes ``BANDWIDTH_BOUND`` times as
    long as the smallest (bandwidth then dominates; fast links need larger sizes than slow
    ones). Times are reduced to the slowest rank, so every rank stops at the same size.
    """
    points: dict[str, dict[str, list[tuple[float, float]]]] = {kind: {} for kind in COLLECTIVE_KINDS}
    for kind in COLLECTIVE_KINDS:
        for link in LINKS:
            if groups.size(link) == 1:
                continue
            pts = points[kind][link] = []
            for size in sizes or ADAPTIVE_SIZES:
                pts.append(_median_seconds(groups, kind, link, size, repeats, warmup))
                if sizes is None and len(pts) >= 2 and pts[-1][1] >= BANDWIDTH_BOUND * pts[0][1]:
                    break
    return points


def _global_collective(groups: MeshGroups, kind: str, depth: int) -> Callable[[], None]:
    """One global ``kind`` over the whole mesh, HO-Ring at pipeline ``depth`` (0: the two-phase
    collectives), whose full size cuts into ``max(CHUNK_DEPTHS)`` chunks of HO-Ring's minimum."""
    full = torch.ones(max(CHUNK_DEPTHS) * DEFAULT_MIN_CHUNK_BYTES // 4, dtype=torch.float32, device=groups.device)
    shard = full.new_ones(full.numel() // groups.world)
    full = full[: shard.numel() * groups.world]
    collectives = HORingCollectives(groups, chunks=depth) if depth else HierarchicalCollectives(groups)
    if kind == "all_gather":
        return lambda: collectives.all_gather(full, shard)
    return lambda: collectives.reduce_scatter(shard, full)


def measure_ho_ring(groups: MeshGroups, fits: dict[str, dict[str, LinkFit]], repeats: int = 3,
                    warmup: int = 1) -> tuple[dict[str, list[tuple[int, float]]], dict[str, HORingCost]]:
    """The two-phase collectives and HO-Ring at each of ``CHUNK_DEPTHS``, timed at one size:
    ``({kind: [(depth, median seconds)]}, {kind: HORingCost})``, depth 0 for the two-phase ones.

    ``fits`` are the links' fits per kind (from :func:`measure`); they give the overlap term
    min(a, b) that :func:`~paro_fsdp.planner.calibration.fit_ho_ring_cost` takes out, from the
    bytes each link carried. Empty on a mesh with a one-rank link (HO-Ring then runs the one
    link's collective, uncut).
    """
    if groups.single_link is not None:
        return {}, {}
    points: dict[str, list[tuple[int, float]]] = {}
    costs: dict[str, HORingCost] = {}
    for kind in CHUNKED_KINDS:
        pts = points[kind] = []
        for depth in (0, *CHUNK_DEPTHS):
            op = _global_collective(groups, kind, depth)

            def burst() -> None:
                for _ in range(BACK_TO_BACK):
                    op()

            groups.stats.reset()
            times = [_timed(burst, groups.device) / BACK_TO_BACK for _ in range(warmup + repeats)][warmup:]
            pts.append((depth, statistics.median(times)))
        calls = (warmup + repeats) * BACK_TO_BACK  # the last depth's; the depth does not change the bytes
        intra_t, inter_t = (groups.stats.get(link=link) / calls / fits[kind][link].bandwidth for link in (INTRA, INTER))
        costs[kind] = fit_ho_ring_cost(pts[1:], pts[0][1], min(intra_t, inter_t))
    return points, costs


def quant_rate(device: torch.device, numel: int = 1 << 22, repeats: int = 3) -> float:
    """Elements per second through a block quantize and dequantize on ``device`` (int8, the
    default block), best of ``repeats``: what quantized inter-group traffic costs a rank.
    Local to the calling rank (no collective), so one rank may measure it alone."""
    x = torch.randn(1, numel, device=device)
    best = math.inf
    for _ in range(repeats + 1):  # the first warms up
        start = time.perf_counter()
        dequantize(quantize(x, INT8, DEFAULT_BLOCK_SIZE), numel, INT8, DEFAULT_BLOCK_SIZE)
        if device.type != "cpu":
            torch.accelerator.synchronize()
        best = min(best, time.perf_counter() - start)
    return numel / best


def run_probe(mesh: DeviceMesh, sizes: tuple[int, ...] | None = None, repeats: int = 3,
              chunking: bool = True) -> Calibration:
    """Measure both links of ``mesh`` (2D, ``(dp_replicate, dp_shard)``) and fit them.

    A link whose groups have one rank carries no bytes in any strategy, so its rate never
    enters an estimate; it gets the other link's fit (and no points) to keep the file complete.
    With ``chunking``, what cutting a collective into HO-Ring's chunks costs is measured too
    (:func:`measure_ho_ring`): what choosing the collectives and HO-Ring's depth needs.
    """
    groups = MeshGroups(mesh)
    points = measure(groups, sizes, repeats)
    if not points["all_gather"]:
        raise ValueError("paro probe needs at least 2 ranks: with 1 rank there is no link to measure")
    fits = {kind: {link: fit_link(p) for link, p in links.items()} for kind, links in points.items()}
    for links in fits.values():
        for link in LINKS:
            links.setdefault(link, next(iter(links.values())))
    ho_ring_points, ho_ring_cost = measure_ho_ring(groups, fits, repeats) if chunking else ({}, {})
    return Calibration(nodes=groups.groups, ranks_per_node=groups.group_size, intra=fits["all_gather"][INTRA],
                       inter=fits["all_gather"][INTER], ops={k: v for k, v in fits.items() if k != "all_gather"},
                       backend=dist.get_default_backend_for_device(mesh.device_type),
                       device_type=mesh.device_type, points=points, quant_rate=quant_rate(groups.device),
                       ho_ring_cost=ho_ring_cost, ho_ring_points=ho_ring_points)


def add_probe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="paro_calibration.json", help="calibration file to write (rank 0)")
    p.add_argument("--ranks-per-node", type=int, default=None,
                   help="ranks per group m (default: torchrun's LOCAL_WORLD_SIZE)")
    p.add_argument("--sizes", help="comma-separated bytes each rank contributes per collective; the largest "
                                   "should be bandwidth-bound (default: grow 8x from 64 KiB until it is)")
    p.add_argument("--repeats", type=int, default=3, help="timed samples per size, median kept (default 3)")


def _parse_sizes(text: str | None, error: Callable[[str], None]) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        error(f"--sizes: expected comma-separated byte counts like 65536,1048576, got {text!r}")
    if len(set(sizes)) < 2 or min(sizes) < 4:
        error(f"--sizes: need >= 2 distinct sizes of >= 4 bytes to fit latency and bandwidth, got {text!r}")
    return sizes


def run_from_args(args: argparse.Namespace, error: Callable[[str], None]) -> int:
    """Entry of ``paro probe`` inside each torchrun worker."""
    sizes = _parse_sizes(args.sizes, error)
    if args.repeats < 1:
        error(f"--repeats: expected an integer >= 1, got {args.repeats}")
    if "WORLD_SIZE" not in os.environ:
        error("run under torchrun (or python -m paro_fsdp.cluster): e.g. "
              "torchrun --nnodes 2 --nproc-per-node 8 ... -m paro_fsdp probe --out paro_calibration.json")
    world = int(os.environ["WORLD_SIZE"])
    if world < 2:
        error("paro probe needs at least 2 ranks (with 1 there is no link to measure): launch it with "
              "torchrun --nproc-per-node >= 2, or across nodes")
    m = args.ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if m < 1 or world % m:
        error(f"--ranks-per-node: {m} does not divide the {world} ranks into equal groups")
    accelerator = torch.accelerator.current_accelerator()
    device_type = accelerator.type if accelerator is not None else "cpu"
    if device_type != "cpu":
        torch.get_device_module(device_type).set_device(int(os.environ.get("LOCAL_RANK", 0)))
    mesh = init_device_mesh(device_type, (world // m, m), mesh_dim_names=(REPLICATE_DIM, SHARD_DIM))
    try:
        cal = run_probe(mesh, sizes, args.repeats)
        if dist.get_rank() == 0:
            write_calibration(cal, args.out)
            fits = {"all_gather": {INTRA: cal.intra, INTER: cal.inter}, **cal.ops}
            for kind, links in fits.items():
                for link, fit in links.items():
                    print(f"{kind} {link}: {fit.bandwidth / 1e9:.4g} GB/s per rank, {fit.latency * 1e6:.1f} us "
                          f"per collective")
            for kind, cost in cal.ho_ring_cost.items():
                timed = ", ".join(f"{t * 1e3:.2f} ms at depth {c}" if c else f"two-phase {t * 1e3:.2f} ms"
                                  for c, t in cal.ho_ring_points[kind])
                print(f"HO-Ring {kind}: {cost.fixed * 1e3:+.2f} ms to cut, {cost.per_chunk * 1e3:+.2f} ms per chunk "
                      f"after the first ({timed})")
            print(f"quantize + dequantize: {cal.quant_rate / 1e6:.4g} M elements/s per rank")
            print(f"calibration for {cal.nodes} x {cal.ranks_per_node} ranks written to {args.out}")
    finally:
        dist.destroy_process_group()
    return 0
