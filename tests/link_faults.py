"""The link-fault scenario on the emulated cluster, and what it measured (test and fault-matrix script).

One torchrun job of ``tests/link_fault_train.py`` on 2 nodes, three passes of ``STEPS`` steps,
each from the same seed on the same data:

1. uninterrupted, the reference;
2. node 1's link cut for ``SHORT_OUTAGE_S`` at step ``CUT_AT_STEP``, under a ``SURVIVE_TIMEOUT_S``
   collective timeout: training must go on with the reference's losses;
3. node 1's link cut for good at step ``CUT_AT_STEP``, under a ``FAIL_TIMEOUT_S`` timeout: every
   rank must fail with a :class:`~paro_fsdp.comm.errors.CollectiveError` naming the collective,
   its phase and link, within the timeout plus ``DETECT_BOUND_S``, and exit non-zero.

Running the reference in the same job (not a second job) halves the test's cost: start-up
dominates it.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from paro_fsdp.cluster import ClusterResult, EmulatedCluster, LinkFault

TRAIN = Path(__file__).with_name("link_fault_train.py")
STEPS = 6
CUT_AT_STEP = 2
SHORT_OUTAGE_S = 2.0
SURVIVE_TIMEOUT_S = 30.0
FAIL_TIMEOUT_S = 10.0
# Stated bound: a rank names the failed collective at most this long after the timeout counted
# from the cut (it may first finish the step it is computing, then its peers' errors or exits
# reach it). Measured: 0.0 to 0.2 s over the timeout on 2 heavily loaded cores.
DETECT_BOUND_S = 5.0
# After the error: the interpreter exits at once; the process (teardown) and node 0's torchrun
# took 2 to 7 s more there.
EXIT_BOUND_S = 20.0
COLLECTIVES = {"all_gather", "reduce_scatter", "all_reduce", "all_to_all"}
PHASES = {"param_gather", "grad_reduce", "sync_g", "sync_p", "other"}

_STEP = re.compile(r"^pass=(\d+) step=(\d+) rank=(\d+) loss=(\S+) wall=([\d.]+)$")
_ERROR = re.compile(r"^COLLECTIVE_ERROR rank=(\d+) wall=([\d.]+) collective=(\S+) purpose=(\S+) phase=(\S+) "
                    r"link=(\S+) ranks=(\S+) reason=(\S+) elapsed=([\d.]+) timeout=(\S+) \| (.*)$")
_EXIT = re.compile(r"^exit rank=(\d+) wall=([\d.]+)$")


def faults() -> list[LinkFault]:
    return [LinkFault(node=1, duration_s=SHORT_OUTAGE_S, after=rf"^pass=2 step={CUT_AT_STEP} "),
            LinkFault(node=1, duration_s=None, after=rf"^pass=3 step={CUT_AT_STEP} ")]


def train_args(strategy: str, comm: str = "default") -> list[str]:
    return [str(TRAIN), "--steps", str(STEPS), "--passes", "3", "--strategy", strategy, "--comm", comm,
            "--timeout", f"{SURVIVE_TIMEOUT_S:g},{SURVIVE_TIMEOUT_S:g},{FAIL_TIMEOUT_S:g}", "--step-sleep", "0.1"]


def run_scenario(strategy: str = "IIG", nodes: int = 2, ranks_per_node: int = 2, inter_bw: str = "100mbit",
                 comm: str = "default", timeout: float = 300,
                 echo: Callable[[str], None] | None = None) -> ClusterResult:
    with EmulatedCluster(nodes, ranks_per_node, inter_bw, python=sys.executable) as cluster:
        return cluster.run(train_args(strategy, comm), timeout=timeout, faults=faults(),
                           echo=echo or (lambda line: None))


def _lines(result: ClusterResult) -> list[str]:
    return [line for node in result.nodes for line in node.output]


def analyze(result: ClusterResult, world: int) -> dict[str, Any]:
    """What the scenario measured: the short outage (``short``) and the permanent cut (``cut``)."""
    steps: dict[tuple[int, int, int], tuple[str, float]] = {}
    errors: dict[int, dict[str, Any]] = {}
    exits: dict[int, float] = {}
    for line in _lines(result):
        if m := _STEP.match(line):
            steps[int(m[1]), int(m[3]), int(m[2])] = (m[4], float(m[5]))
        elif m := _ERROR.match(line):
            errors[int(m[1])] = {
                "wall": float(m[2]), "collective": m[3], "purpose": None if m[4] == "None" else m[4],
                "phase": m[5], "link": m[6], "ranks": [int(r) for r in m[7].split(",")], "reason": m[8],
                "elapsed_s": float(m[9]), "timeout_s": None if m[10] == "None" else float(m[10]), "message": m[11],
            }
        elif m := _EXIT.match(line):
            exits[int(m[1])] = float(m[2])
    events = [e for e in result.link_events if e.node == 1]
    downs, ups = [e for e in events if not e.up], [e for e in events if e.up]
    out: dict[str, Any] = {"world": world, "timed_out": result.timed_out,
                           "returncodes": [n.returncode for n in result.nodes],
                           "stopped": [n.stopped for n in result.nodes], "elapsed_s": result.elapsed_s}

    ranks = range(world)
    reference = {(r, s): steps.get((1, r, s)) for r in ranks for s in range(1, STEPS + 1)}
    short: dict[str, Any] = {"outage_s": None}
    if len(downs) >= 1 and len(ups) >= 1:
        down, up = downs[0].wall, ups[0].wall
        short["outage_s"] = up - down
        second = {(r, s): steps.get((2, r, s)) for r in ranks for s in range(1, STEPS + 1)}
        short["completed"] = all(v is not None for v in second.values())
        short["losses_equal"] = short["completed"] and all(
            reference[k] is not None and reference[k][0] == second[k][0] for k in second)
        after_up = []
        for r in ranks:
            walls = sorted(v[1] for s in range(1, STEPS + 1) if (v := second[r, s]))
            after_up.append(next((w for w in walls if w >= up), None))
            gaps = [b - a for a, b in zip(walls, walls[1:])]
            short["stall_s"] = max(short.get("stall_s") or 0.0, max(gaps, default=0.0))
        short["steps_after_outage"] = sum(1 for v in second.values() if v is not None and v[1] >= up)
        # Time to recover: link up -> every rank has completed a step again.
        short["recover_s"] = (max(after_up) - up) if all(a is not None for a in after_up) else None
        second_cut = downs[1].wall if len(downs) > 1 else float("inf")
        short["failed_ranks"] = sorted(r for r, e in errors.items() if e["wall"] < second_cut)
    out["short"] = short

    cut: dict[str, Any] = {"at_wall": None}
    if len(downs) >= 2:
        at = downs[1].wall
        cut["at_wall"] = at
        cut["errors"] = {r: {**e, "after_cut_s": e["wall"] - at} for r, e in sorted(errors.items())}
        cut["named_ranks"] = sorted(errors)
        cut["detect_s"] = min((e["wall"] - at for e in errors.values()), default=None)
        cut["all_named_s"] = max((e["wall"] - at for e in errors.values()), default=None)
        cut["exit_s"] = max((w - at for r, w in exits.items() if r in errors), default=None)
        cut["exited_ranks"] = sorted(r for r, w in exits.items() if w >= at)
        # torchrun on node 0 (the rendezvous host) exits once its workers have: the ranks' processes are gone.
        host = result.nodes[0]
        cut["host_node_exit_s"] = None if host.stopped or host.exited_s is None else host.exited_s - downs[1].at_s
        third = [s for (p, r, s) in steps if p == 3]
        cut["last_step"] = max(third, default=0)
    out["cut"] = cut
    return out
