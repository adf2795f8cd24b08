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
# After one node fails, the others block in a collective until their process group's timeout
# (c10d's default: 30 min for gloo); stop them this long after the first failure.
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
    exited_s: float | None = None  # seconds from the run's start to torchrun's exit
    stopped: bool = False  # still running when the run ended: stopped by the cluster


@dataclass(frozen=True)
class LinkFault:
    """Cut ``node``'s link for ``duration_s`` seconds (None: until the run ends).

    The cut starts ``delay_s`` seconds after the first output line of any node that matches the
    regular expression ``after`` (``re.search``), or after launch when ``after`` is None.
    """

    node: int
    duration_s: float | None
    delay_s: float = 0.0
    after: str | None = None


@dataclass(frozen=True)
class LinkEvent:
    """A node's link went down or came back up, ``at_s`` seconds after the run started (``wall``: ``time.time()``)."""

    node: int
    up: bool
    at_s: float
    wall: float


@dataclass(frozen=True)
class ClusterResult:
    """One ``EmulatedCluster.run``: per-node results; ``timed_out`` if it was stopped at the deadline."""

    nodes: list[NodeResult]
    elapsed_s: float
    timed_out: bool
    link_events: list[LinkEvent] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(n.returncode == 0 for n in self.nodes)

    def summary(self) -> list[str]:
        """One line per node: exit code and bytes on the link and on the loopback."""
        lines = [f"timed out after {self.elapsed_s:.1f} s"] if self.timed_out else []
        lines += [f"node{e.node}: link {'up' if e.up else 'down'} at {e.at_s:.1f} s" for e in self.link_events]
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
                 python: str = sys.executable, max_restarts: int = 0) -> None:
        if ranks_per_node < 1:
            raise ValueError(f"ranks_per_node must be >= 1, got {ranks_per_node}")
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
        self.ranks_per_node = ranks_per_node
        self.max_restarts = max_restarts
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
            "--max-restarts", str(self.max_restarts), *target,
        ]

    def environment(self, node: int, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Environment of ``node``'s ranks: all traffic on the node's own address.

        Binding gloo/NCCL to ``eth0`` makes ranks of the same node reach each other at the node's
        address (through ``lo``) and other nodes through the shaped veth. ``NCCL_HOSTID`` keeps
        NCCL from treating namespaces of one machine as one host (it would use shared memory).

        With restarts, every rendezvous round gets a fresh store (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE``).
        When one node's workers fail, the other nodes restart theirs either because they failed
        too (their restart count goes up) or because a node is waiting to rejoin (it does not),
        so workers of one round can disagree on the restart count, which scopes the agent's
        shared store (``torchtitan_patch.elastic``).
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
        if self.max_restarts:
            env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
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

    def set_link(self, node: int, up: bool) -> None:
        """Cut (``up=False``) or restore ``node``'s link now (also during a ``run``, from another thread)."""
        self._require_created()
        self.topology.set_link(node, up)

    def run(self, target: Sequence[str], timeout: float | None = None, env: dict[str, str] | None = None,
            echo: Callable[[str], None] | None = None, faults: Sequence[LinkFault] = (),
            failure_grace_s: float = FAILURE_GRACE_S) -> ClusterResult:
        """Run ``target`` (``script.py args`` or ``-m module args``) under torchrun on every node.

        Output lines go to ``echo`` prefixed ``[node<i>] `` (default: stdout) and are kept in the
        result. When a node fails the others are stopped ``failure_grace_s`` later; after
        ``timeout`` seconds all are stopped and ``timed_out`` is set. ``faults`` cut node links
        during the run (see :class:`LinkFault`); every link is up again when ``run`` returns, and
        the result lists when each went down and up.
        """
        if not target:
            raise ValueError("target is empty: give a script path (and arguments) or -m module")
        for fault in faults:
            if not 0 <= fault.node < self.nodes:
                raise ValueError(f"LinkFault.node must be in 0..{self.nodes - 1}, got {fault.node}")
        echo = echo or _print_line
        before = self.counters()  # also checks that the cluster exists
        start = time.monotonic()
        driver = _FaultDriver(self.topology, faults, start)
        procs: list[subprocess.Popen[str]] = []
        outputs: list[list[str]] = [[] for _ in range(self.nodes)]
        exited: list[float | None] = [None] * self.nodes
        readers = []
        try:
            driver.start()
            for node in range(self.nodes):
                proc = subprocess.Popen(self.command(node, target), env=self.environment(node, env),
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        bufsize=1, start_new_session=True, errors="replace")
                procs.append(proc)
                reader = threading.Thread(target=_pump, args=(proc, f"[node{node}] ", outputs[node], echo,
                                                              driver.observe), daemon=True)
                reader.start()
                readers.append(reader)
            timed_out = self._wait(procs, None if timeout is None else start + timeout, exited, start,
                                   failure_grace_s)
        finally:
            self._stop(procs)
            driver.finish()
            for reader in readers:
                reader.join(timeout=TERMINATE_GRACE_S)
        elapsed = time.monotonic() - start
        after = self.counters()
        return ClusterResult(
            nodes=[NodeResult(i, procs[i].returncode, after[i] - before[i], outputs[i],
                              exited_s=exited[i] if exited[i] is not None else elapsed, stopped=exited[i] is None)
                   for i in range(self.nodes)],
            elapsed_s=elapsed, timed_out=timed_out, link_events=driver.events,
        )

    @staticmethod
    def _wait(procs: list[subprocess.Popen[str]], deadline: float | None,
              exited: list[float | None] | None = None, start: float = 0.0,
              failure_grace_s: float = FAILURE_GRACE_S) -> bool:
        failed_at = None
        while True:
            codes = [p.poll() for p in procs]
            now = time.monotonic()
            if exited is not None:
                for i, code in enumerate(codes):
                    if code is not None and exited[i] is None:
                        exited[i] = now - start
            if all(c is not None for c in codes):
                return False
            if deadline is not None and now >= deadline:
                return True
            if failed_at is None and any(c not in (None, 0) for c in codes):
                failed_at = now
            if failed_at is not None and now - failed_at > failure_grace_s:
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


def _pump(proc: subprocess.Popen[str], prefix: str, sink: list[str], echo: Callable[[str], None],
          observe: Callable[[str], None] | None = None) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        sink.append(line)
        if observe is not None:
            observe(line)
        echo(prefix + line)


class _FaultDriver:
    """Runs a ``run``'s link faults, each on its own thread, and records when links changed."""

    def __init__(self, topology: Topology, faults: Sequence[LinkFault], start: float) -> None:
        self.topology, self.start_time = topology, start
        self.faults = list(faults)
        self.events: list[LinkEvent] = []
        self._patterns = [re.compile(f.after) if f.after is not None else None for f in self.faults]
        self._triggered = [threading.Event() for _ in self.faults]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._down: set[int] = set()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for i, pattern in enumerate(self._patterns):
            if pattern is None:
                self._triggered[i].set()
            thread = threading.Thread(target=self._drive, args=(i,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def observe(self, line: str) -> None:
        for pattern, triggered in zip(self._patterns, self._triggered):
            if pattern is not None and not triggered.is_set() and pattern.search(line):
                triggered.set()

    def _set(self, node: int, up: bool) -> None:
        with self._lock:
            if up == (node not in self._down):
                return
            self.topology.set_link(node, up)
            (self._down.discard if up else self._down.add)(node)
            self.events.append(LinkEvent(node, up, time.monotonic() - self.start_time, time.time()))

    def _drive(self, i: int) -> None:
        fault = self.faults[i]
        while not self._triggered[i].wait(0.05):
            if self._stop.is_set():
                return
        if self._stop.wait(fault.delay_s):
            return
        try:
            self._set(fault.node, False)
            if fault.duration_s is None or self._stop.wait(fault.duration_s):
                return  # restored by finish()
            self._set(fault.node, True)
        except ClusterError as e:  # the run goes on; the result shows what happened
            print(f"[cluster] link fault on node {fault.node} failed: {e}", file=sys.stderr, flush=True)

    def finish(self) -> None:
        """Stop pending faults and bring every link this run cut back up."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=TERMINATE_GRACE_S)
        for node in sorted(self._down):
            try:
                self._set(node, True)
            except ClusterError as e:
                print(f"[cluster] restoring node {node}'s link failed: {e}", file=sys.stderr, flush=True)


_print_lock = threading.Lock()


def _print_line(line: str) -> None:
    with _print_lock:
        print(line, flush=True)


def run(target: Sequence[str], nodes: int, ranks_per_node: int, inter_bw: str, timeout: float | None = None,
        env: dict[str, str] | None = None, echo: Callable[[str], None] | None = None) -> ClusterResult:
    """Build a cluster, run ``target`` on it once, tear it down."""
    with EmulatedCluster(nodes, ranks_per_node, inter_bw) as cluster:
        return cluster.run(target, timeout=timeout, env=env, echo=echo)
