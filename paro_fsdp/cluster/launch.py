"""Run ``torchrun`` on every node of an emulated cluster and collect per-node results."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from paro_fsdp.cluster.network import (
    NAMESPACE_PREFIX,
    NODE_IFNAME,
    ClusterError,
    ClusterPermissionError,
    LinkCounters,
    Topology,
    cleanup_namespaces,
    missing_requirements,
    namespace_pids,
)

RDZV_PORT = 29400
# After one node fails, the others usually block in a collective until gloo's 30 min timeout.
FAILURE_GRACE_S = 5.0
TERMINATE_GRACE_S = 5.0

# Environment a launched script can read (see paro_fsdp.cluster.counters).
ENV_NODE = "PARO_CLUSTER_NODE"
ENV_NODES = "PARO_CLUSTER_NODES"
ENV_IFNAME = "PARO_CLUSTER_IFNAME"
ENV_RATE = "PARO_CLUSTER_LINK_BITS"

_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_sequence = itertools.count()
_cleaned_own_leftovers = False


@dataclass(frozen=True)
class NodeResult:
    """What one node did: ``torchrun``'s exit code, its output, the bytes its links carried."""

    node: int
    returncode: int | None
    bytes: LinkCounters
    output: list[str] = field(repr=False)


@dataclass(frozen=True)
class ClusterResult:
    """One ``EmulatedCluster.run``: per-node results; ``timed_out`` if it was stopped at the deadline."""

    nodes: list[NodeResult]
    elapsed_s: float
    timed_out: bool

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(n.returncode == 0 for n in self.nodes)

    def summary(self) -> list[str]:
        """One line per node: exit code and bytes on the link and on the loopback."""
        lines = [f"timed out after {self.elapsed_s:.1f} s"] if self.timed_out else []
        for n in self.nodes:
            lines.append(f"node{n.node}: exit {n.returncode}, link {NODE_IFNAME} tx {_mib(n.bytes.tx)} "
                         f"rx {_mib(n.bytes.rx)}, loopback {_mib(n.bytes.loopback)}")
        return lines


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


class EmulatedCluster:
    """K nodes of M ranks, each node a network namespace with a ``rate``-limited link.

    Use as a context manager: the namespaces exist between ``__enter__`` and ``__exit__`` and are
    always removed on the way out, whatever ended the block. Several ``run`` calls may share one
    cluster.
    """

    def __init__(self, nodes: int, ranks_per_node: int, inter_bw: str, subnet: str = "10.77.0.0/24",
                 python: str = sys.executable) -> None:
        if ranks_per_node < 1:
            raise ValueError(f"ranks_per_node must be >= 1, got {ranks_per_node}")
        self.ranks_per_node = ranks_per_node
        self.python = python
        self.name = f"{NAMESPACE_PREFIX}{os.getpid()}-{next(_sequence)}"
        self.topology = Topology(self.name, nodes, inter_bw, subnet)
        self.nodes = nodes
        self.addresses = [str(a.ip) for a in self.topology.addresses]

    def __enter__(self) -> EmulatedCluster:
        reason = missing_requirements()
        if reason:
            raise ClusterPermissionError(reason)
        global _cleaned_own_leftovers
        if not _cleaned_own_leftovers:
            # Leftovers of a killed run whose pid this process reuses; never anybody else's.
            cleanup_namespaces(os.getpid())
            _cleaned_own_leftovers = True
        self.topology.create()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.topology.destroy()

    def command(self, node: int, target: Sequence[str]) -> list[str]:
        """The ``torchrun`` command line of ``node`` (c10d rendezvous on node 0's address).

        c10d ignores ``--node-rank``: it ranks nodes by ``--local-addr``, whose string order is
        the node order (see ``network._node_addresses``), so node i holds ranks i*M .. i*M+M-1.
        """
        return [
            "ip", "netns", "exec", self.topology.nodes[node],
            self.python, "-m", "torch.distributed.run",
            "--nnodes", str(self.nodes), "--nproc-per-node", str(self.ranks_per_node),
            "--node-rank", str(node), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{self.addresses[0]}:{RDZV_PORT}", "--rdzv-id", self.name,
            "--rdzv-conf", f"is_host={int(node == 0)}", "--local-addr", self.addresses[node],
            "--max-restarts", "0", *target,
        ]

    def environment(self, node: int, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Environment of ``node``'s ranks: all traffic on the node's own address.

        Binding gloo/NCCL to ``eth0`` makes ranks of the same node reach each other at the node's
        address (through ``lo``) and other nodes through the shaped veth. ``NCCL_HOSTID`` keeps
        NCCL from treating namespaces of one machine as one host (it would use shared memory).
        """
        env = dict(os.environ)
        env.update({
            "GLOO_SOCKET_IFNAME": NODE_IFNAME, "NCCL_SOCKET_IFNAME": NODE_IFNAME,
            "NCCL_HOSTID": f"{self.name}-n{node}", "NCCL_IB_DISABLE": "1",
            ENV_NODE: str(node), ENV_NODES: str(self.nodes), ENV_IFNAME: NODE_IFNAME,
            ENV_RATE: str(self.topology.rate_bits),
        })
        devices = _gpu_count()
        if devices >= self.nodes * self.ranks_per_node and "CUDA_VISIBLE_DEVICES" not in env:
            # Each node gets its own GPUs, so LOCAL_RANK picks a device no other node uses.
            first = node * self.ranks_per_node
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in range(first, first + self.ranks_per_node))
        env.pop("MASTER_ADDR", None)  # torchrun sets it from the rendezvous
        env.pop("MASTER_PORT", None)
        # Scripts given by path run with their own folder on sys.path; make this project importable.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PROJECT_ROOT, env.get("PYTHONPATH")) if p)
        env.update(extra or {})
        return env

    def counters(self) -> list[LinkCounters]:
        """Byte counters of every node since the cluster was built."""
        self._require_created()
        return self.topology.counters()

    def _require_created(self) -> None:
        if not self.topology.created:
            raise ClusterError("the cluster's namespaces do not exist: use it inside `with EmulatedCluster(...)`")

    def run(self, target: Sequence[str], timeout: float | None = None, env: dict[str, str] | None = None,
            echo: Callable[[str], None] | None = None) -> ClusterResult:
        """Run ``target`` (``script.py args`` or ``-m module args``) under torchrun on every node.

        Output lines go to ``echo`` prefixed ``[node<i>] `` (default: stdout) and are kept in the
        result. When a node fails the others are stopped after a short grace period; after
        ``timeout`` seconds all are stopped and ``timed_out`` is set.
        """
        if not target:
            raise ValueError("target is empty: give a script path (and arguments) or -m module")
        echo = echo or _print_line
        before = self.counters()  # also checks that the cluster exists
        start = time.monotonic()
        procs: list[subprocess.Popen[str]] = []
        outputs: list[list[str]] = [[] for _ in range(self.nodes)]
        readers = []
        try:
            for node in range(self.nodes):
                proc = subprocess.Popen(self.command(node, target), env=self.environment(node, env),
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        bufsize=1, start_new_session=True, errors="replace")
                procs.append(proc)
                reader = threading.Thread(target=_pump, args=(proc, f"[node{node}] ", outputs[node], echo),
                                          daemon=True)
                reader.start()
                readers.append(reader)
            timed_out = self._wait(procs, None if timeout is None else start + timeout)
        finally:
            self._stop(procs)
            for reader in readers:
                reader.join(timeout=TERMINATE_GRACE_S)
        elapsed = time.monotonic() - start
        after = self.counters()
        return ClusterResult(
            nodes=[NodeResult(i, procs[i].returncode, after[i] - before[i], outputs[i]) for i in range(self.nodes)],
            elapsed_s=elapsed, timed_out=timed_out,
        )

    @staticmethod
    def _wait(procs: list[subprocess.Popen[str]], deadline: float | None) -> bool:
        failed_at = None
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                return False
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return True
            if failed_at is None and any(c not in (None, 0) for c in codes):
                failed_at = now
            if failed_at is not None and now - failed_at > FAILURE_GRACE_S:
                return False
            time.sleep(0.05)

    def _stop(self, procs: list[subprocess.Popen[str]]) -> None:
        """SIGTERM torchrun (it forwards to its workers), then SIGKILL whatever is left in the nodes."""
        running = [p for p in procs if p.poll() is None]
        for p in running:
            _signal_group(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + TERMINATE_GRACE_S
        for p in running:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p.pid, signal.SIGKILL)
        for namespace in self.topology.nodes:
            for pid in namespace_pids(namespace):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in procs:
            try:
                p.wait(timeout=TERMINATE_GRACE_S)
            except subprocess.TimeoutExpired:
                pass


def _gpu_count() -> int:
    """NVIDIA GPUs on this machine (device files), without importing a GPU library."""
    return sum(1 for name in os.listdir("/dev") if re.fullmatch(r"nvidia\d+", name)) if os.path.isdir("/dev") else 0


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _pump(proc: subprocess.Popen[str], prefix: str, sink: list[str], echo: Callable[[str], None]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        sink.append(line)
        echo(prefix + line)


_print_lock = threading.Lock()


def _print_line(line: str) -> None:
    with _print_lock:
        print(line, flush=True)


def run(target: Sequence[str], nodes: int, ranks_per_node: int, inter_bw: str, timeout: float | None = None,
        env: dict[str, str] | None = None, echo: Callable[[str], None] | None = None) -> ClusterResult:
    """Build a cluster, run ``target`` on it once, tear it down."""
    with EmulatedCluster(nodes, ranks_per_node, inter_bw) as cluster:
        return cluster.run(target, timeout=timeout, env=env, echo=echo)
