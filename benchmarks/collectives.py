"""Global all-gather / reduce-scatter / all-reduce on the emulated two-level cluster.

Compares, side by side in one run (interleaved repetitions, so machine noise hits all alike):
``backend_flat`` (the backend's own collective over the flattened group), ``flat_ring`` (send/recv ring
in group-major order), ``hierarchical`` (inter then intra phase, no overlap) and ``ho_ring``
(HO-Ring, overlapped phases). Inter-node bytes come from the nodes' interface counters.

    python -m benchmarks.collectives                  # quick subset, writes docs/collectives-benchmark.md
    python -m benchmarks.collectives --full           # 1..256 MiB, more repetitions
    python -m benchmarks.collectives --render         # re-render the doc from the saved raw results

Needs root (network namespaces); see ``python -m paro_fsdp.cluster --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.collectives_report import IMPLS, PROFILE_IMPLS

REPO = Path(__file__).resolve().parents[1]
COLLECTIVES = ("all_gather", "reduce_scatter", "all_reduce")
QUICK_SIZES_MIB = (1, 16, 64)
FULL_SIZES_MIB = (1, 4, 16, 64, 256)
DEFAULT_DOC = REPO / "docs" / "collectives-benchmark.md"


def _csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.collectives", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help=f"sizes {FULL_SIZES_MIB} MiB and 5 repetitions")
    p.add_argument("--sizes", type=_csv(int), help="collective sizes S in MiB (total tensor), comma-separated")
    p.add_argument("--collectives", type=_csv(str), default=list(COLLECTIVES))
    p.add_argument("--impls", type=_csv(str), default=list(IMPLS),
                   help=f"comma-separated subset of {', '.join(IMPLS + PROFILE_IMPLS)}")
    p.add_argument("--profile", action="store_true",
                   help="also time the inter and intra phases of the hierarchical collectives alone")
    p.add_argument("--topologies", type=_csv(str), default=["2x4", "4x2"], help="NODESxRANKS, comma-separated")
    p.add_argument("--rates", type=_csv(str), default=["250mbit", "1gbit"], help="link rates (tc units)")
    p.add_argument("--reps", type=int, help="timed repetitions per case (default 3, --full 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions, also checked for correctness")
    p.add_argument("--chunks", type=_csv(int), default=[],
                   help="HO-Ring pipeline depths (default: its own); several give one ho_ring(c=N) row each")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per cluster run")
    p.add_argument("--doc", type=Path, default=DEFAULT_DOC, help="markdown file to write the results into")
    p.add_argument("--raw", type=Path, help="raw results JSON (default: the doc's path with .json)")
    p.add_argument("--render", action="store_true", help="only re-render the doc from the raw results")
    p.add_argument("--merge", action="store_true",
                   help="keep the saved runs of other topology/rate pairs (re-measure some, e.g. when quieter)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--results", type=Path, help=argparse.SUPPRESS)
    return p


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    args.sizes = args.sizes or list(FULL_SIZES_MIB if args.full else QUICK_SIZES_MIB)
    args.reps = args.reps or (5 if args.full else 3)
    args.raw = args.raw or args.doc.with_suffix(".json")
    if args.profile:
        args.impls += [name for name in PROFILE_IMPLS if name not in args.impls]
    for value, valid, what in ((args.collectives, COLLECTIVES, "--collectives"),
                               (args.impls, IMPLS + PROFILE_IMPLS, "--impls")):
        unknown = set(value) - set(valid)
        if unknown:
            raise SystemExit(f"{what}: unknown {sorted(unknown)}; valid: {', '.join(valid)}")
    for topology in args.topologies:
        if not _topology(topology):
            raise SystemExit(f"--topologies: {topology!r} is not NODESxRANKS with both >= 2 (e.g. 2x4)")
    if args.reps < 1 or args.warmup < 0:
        raise SystemExit("--reps must be >= 1 and --warmup >= 0")
    return args


def _topology(text: str) -> tuple[int, int] | None:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or min(int(p) for p in parts) < 2:
        return None
    return int(parts[0]), int(parts[1])


def topology_arg(text: str) -> tuple[int, int]:
    """``--topologies`` items as an argparse type: ``(nodes, ranks)`` of NODESxRANKS."""
    if (layout := _topology(text)) is None:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NODESxRANKS, both at least 2, e.g. 2x4")
    return layout


def _worker_args(args: argparse.Namespace, results: Path) -> list[str]:
    argv = ["-m", "benchmarks.collectives", "--worker", "--results", str(results),
            "--sizes", ",".join(map(str, args.sizes)), "--collectives", ",".join(args.collectives),
            "--impls", ",".join(args.impls), "--reps", str(args.reps), "--warmup", str(args.warmup)]
    return argv + (["--chunks", ",".join(map(str, args.chunks))] if args.chunks else [])


def drive(args: argparse.Namespace) -> int:
    from paro_fsdp.cluster import EmulatedCluster

    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the cluster is torn down.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    from benchmarks.collectives_report import render

    runs = []
    for topology in args.topologies:
        nodes, ranks = _topology(topology)
        for rate in args.rates:
            print(f"== {topology} at {rate}", flush=True)
            with tempfile.TemporaryDirectory(prefix="paro-bench-") as tmp, \
                    EmulatedCluster(nodes, ranks, rate) as cluster:
                results = Path(tmp) / "results.json"
                load = os.getloadavg()[0]
                outcome = cluster.run(_worker_args(args, results), timeout=args.timeout)
                if not outcome.ok:
                    print("\n".join(outcome.summary()), file=sys.stderr)
                    return 1
                runs.append({"topology": topology, "nodes": nodes, "ranks_per_node": ranks, "rate": rate,
                             "rate_bits": cluster.topology.rate_bits, "elapsed_s": outcome.elapsed_s,
                             "load_before": load, "load_after": os.getloadavg()[0],
                             **json.loads(results.read_text())})
    command = " ".join(["python -m benchmarks.collectives", *sys.argv[1:]])
    for run in runs:
        run["command"], run["created"] = command, time.strftime("%Y-%m-%d %H:%M:%S")
    if args.merge and args.raw.exists():
        fresh = {(r["topology"], r["rate"]) for r in runs}
        runs = [r for r in json.loads(args.raw.read_text())["runs"] if (r["topology"], r["rate"]) not in fresh] + runs
    raw = {"cpus": os.cpu_count(), "runs": runs}
    args.raw.parent.mkdir(parents=True, exist_ok=True)
    args.raw.write_text(json.dumps(raw, separators=(",", ":")))
    render(raw, args.doc)
    print(f"wrote {args.doc} and {args.raw}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _resolve(_parser().parse_args(argv))
    if args.worker:
        from benchmarks.collectives_worker import run_worker

        return run_worker(args)
    if args.render:
        from benchmarks.collectives_report import render

        render(json.loads(args.raw.read_text()), args.doc)
        print(f"wrote {args.doc}")
        return 0
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
