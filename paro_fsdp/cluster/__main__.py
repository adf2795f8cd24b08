"""``python -m paro_fsdp.cluster --nodes K --ranks-per-node M --inter-bw RATE -- script.py [args]``.

Builds the emulated cluster, runs the script (or ``-m module``) under torchrun on every node,
prints each node's output prefixed ``[node<i>]`` and the bytes each node's link carried, and
removes every namespace it created, whether the run succeeds, fails, times out or is
interrupted (Ctrl-C, SIGTERM, SIGHUP).
"""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType

from paro_fsdp.cluster.launch import EmulatedCluster, LinkFault
from paro_fsdp.cluster.network import ClusterError, cleanup_namespaces

EXIT_TIMEOUT = 124
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Stopped(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_signal(signum: int, frame: FrameType | None) -> None:
    # Teardown must not be cut short by a second Ctrl-C.
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise _Stopped(signum)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m paro_fsdp.cluster",
        usage="%(prog)s [options] -- script.py [args] | -- -m module [args]",
        description="Run a torchrun script on K emulated nodes (network namespaces) of M ranks each, "
                    "with each node's link limited to --inter-bw.",
        epilog="example: python -m paro_fsdp.cluster --nodes 2 --ranks-per-node 4 --inter-bw 250mbit "
               "--timeout 600 -- train.py --steps 10. Each node's output is prefixed [node<i>]; the "
               "script finds its node in PARO_CLUSTER_NODE and its link in PARO_CLUSTER_IFNAME "
               "(paro_fsdp.cluster.node_counters() reads the byte counters).",
    )
    p.add_argument("--nodes", type=int, default=2, help="number of nodes (namespaces), default 2")
    p.add_argument("--ranks-per-node", type=int, default=2, help="torchrun --nproc-per-node, default 2")
    p.add_argument("--inter-bw", default="1gbit",
                   help="rate of each node's link, each direction, in tc units (e.g. 250mbit, 1gbit)")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="torchrun --max-restarts on every node: a node whose workers fail restarts them "
                        "and the job resumes (default 0: a failure ends the run)")
    p.add_argument("--timeout", type=float, default=None, help="stop everything after this many seconds")
    p.add_argument("--link-down", nargs=3, action="append", default=[], metavar=("NODE", "DELAY", "DURATION"),
                   help="cut NODE's link DELAY seconds after launch (or after --link-down-after) for DURATION "
                        "seconds ('inf': until the run ends); repeatable")
    p.add_argument("--link-down-after", metavar="REGEX", default=None,
                   help="count --link-down delays from the first output line that matches REGEX")
    p.add_argument("--subnet", default="10.77.0.0/24", help="private subnet for node addresses")
    p.add_argument("--cleanup-stale", action="store_true",
                   help="only delete namespaces left behind by killed runs of this tool, then exit")
    return p


def _link_fault(spec: list[str], after: str | None) -> LinkFault:
    node, delay, duration = spec
    try:
        fault = LinkFault(int(node), None if duration == "inf" else float(duration), float(delay), after)
    except ValueError:
        raise ValueError(f"takes NODE DELAY DURATION (an integer and two numbers of seconds), got {' '.join(spec)}")
    if fault.delay_s < 0 or (fault.duration_s is not None and fault.duration_s <= 0):
        raise ValueError(f"needs DELAY >= 0 and DURATION > 0, got {' '.join(spec)}")
    return fault


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, target = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = _parser().parse_args(own)
    if args.cleanup_stale:
        for namespace in cleanup_namespaces(None):
            print(f"[cluster] deleted stale namespace {namespace}")
        return 0
    if not target:
        _parser().error("give the script after `--`: ... -- script.py [args] or -- -m module [args]")
    try:
        faults = [_link_fault(spec, args.link_down_after) for spec in args.link_down]
    except ValueError as e:
        _parser().error(f"--link-down {e}")
    for sig in _STOP_SIGNALS:
        signal.signal(sig, _on_signal)
    try:
        with EmulatedCluster(args.nodes, args.ranks_per_node, args.inter_bw, subnet=args.subnet,
                             max_restarts=args.max_restarts) as cluster:
            print(f"[cluster] {args.nodes} nodes x {args.ranks_per_node} ranks, link {args.inter_bw} "
                  f"each way, nodes at {', '.join(cluster.addresses)}", flush=True)
            result = cluster.run(target, timeout=args.timeout, faults=faults)
    except ClusterError as e:
        print(f"[cluster] error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"[cluster] error: {e}", file=sys.stderr)
        return 2
    except _Stopped as e:
        print(f"[cluster] stopped by {e}; cluster torn down", file=sys.stderr)
        return 128 + e.signum
    for line in result.summary():
        print(f"[cluster] {line}", flush=True)
    if result.timed_out:
        return EXIT_TIMEOUT
    return next((abs(n.returncode) or 1 for n in result.nodes if n.returncode), 0)


if __name__ == "__main__":
    sys.exit(main())
