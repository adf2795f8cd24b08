"""Network namespaces joined by a bridge, with a rate-limited link per node.

Layout of one emulated cluster (every interface lives inside a namespace the cluster owns, so
nothing is added to the host's network and concurrent clusters cannot collide):

    <name>-sw   bridge br0 with ports n0 .. n{K-1}        (the "switch")
    <name>-n<i> eth0 (veth peer of n<i>) + lo             (node i)

Each node's link is shaped in both directions with an egress ``tbf``: on ``eth0`` (node to
switch) and on the switch port ``n<i>`` (switch to node). Shaping both veth ends is equivalent to
ingress shaping through an ifb device, without needing the ifb module or an ingress redirect,
and keeps each direction of the full-duplex link independent, as on a real NIC.

A node's link can be cut and restored while a job runs (:meth:`Topology.set_link`): the switch
port ``n<i>`` goes down, so the node's ``eth0`` loses carrier as when a cable is pulled or a
switch port fails. Addresses, routes and shaping stay; packets in either direction are dropped
until the port is up again, and open TCP connections survive an outage shorter than their
retransmission limits.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

NODE_IFNAME = "eth0"
NAMESPACE_PREFIX = "paro-"
_CAP_NET_ADMIN, _CAP_SYS_ADMIN = 12, 21

_RATE_UNITS = {  # tc's rate units, in bits per second
    "bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
    "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9, "tbps": 8 * 10**12,
}


class ClusterError(RuntimeError):
    """The emulated cluster could not be set up, run or torn down."""


class ClusterPermissionError(ClusterError):
    """The process lacks the privileges to create network namespaces."""


def parse_rate(rate: str) -> int:
    """Bits per second of a tc rate such as ``250mbit``, ``1gbit`` or ``100mbps`` (bytes)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*", str(rate))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _RATE_UNITS:
        raise ValueError(
            f"invalid link rate {rate!r}: expected a number with one of the tc units "
            f"{', '.join(_RATE_UNITS)} (e.g. 250mbit, 1gbit)"
        )
    bits = int(float(match.group(1)) * _RATE_UNITS[unit])
    if bits <= 0:
        raise ValueError(f"invalid link rate {rate!r}: must be positive")
    return bits


def _effective_capabilities() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def missing_requirements() -> str | None:
    """Why this process cannot build an emulated cluster, or None if it can."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return (f"{' and '.join(missing)} not found on PATH: the emulated cluster needs iproute2 "
                f"(e.g. apt-get install iproute2)")
    caps = _effective_capabilities()
    if os.geteuid() != 0 and not (caps >> _CAP_NET_ADMIN & 1 and caps >> _CAP_SYS_ADMIN & 1):
        return ("the emulated cluster needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) to create "
                "network namespaces; run it as root, e.g. with sudo")
    return None


def _run(args: list[str], what: str) -> str:
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = proc.stderr.strip() or proc.stdout.strip()
        error = ClusterPermissionError if "Operation not permitted" in detail else ClusterError
        raise error(f"{what} failed: `{' '.join(args)}`: {detail}")
    return proc.stdout


def list_namespaces() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    out = _run(["ip", "netns", "list"], "listing network namespaces")
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def namespace_pids(namespace: str) -> list[int]:
    """Processes running inside ``namespace``."""
    proc = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def delete_namespace(namespace: str) -> None:
    """Kill what runs in ``namespace`` and delete it (its veths go with it)."""
    for pid in namespace_pids(namespace):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)


def _owner_pid(namespace: str) -> int | None:
    match = re.match(rf"{re.escape(NAMESPACE_PREFIX)}(\d+)-", namespace)
    return int(match.group(1)) if match else None


def cleanup_namespaces(pid: int | None = None) -> list[str]:
    """Delete this tool's namespaces owned by process ``pid``, or, for None, by dead processes.

    Namespaces are named ``paro-<owner pid>-...``, so leftovers of a killed run can be told
    apart from the namespaces of runs still in progress.
    """
    removed = []
    for namespace in list_namespaces():
        owner = _owner_pid(namespace)
        if owner is None:
            continue
        if pid is not None and owner != pid:
            continue
        if pid is None and os.path.exists(f"/proc/{owner}"):
            continue
        delete_namespace(namespace)
        removed.append(namespace)
    return removed


@dataclass(frozen=True)
class LinkCounters:
    """Byte counters of one node: its link (``eth0``) and its loopback (intra-node traffic)."""

    tx: int
    rx: int
    loopback: int

    def __sub__(self, other: LinkCounters) -> LinkCounters:
        return LinkCounters(self.tx - other.tx, self.rx - other.rx, self.loopback - other.loopback)


class Topology:
    """K node namespaces on one bridge, each link shaped to ``rate`` in both directions."""

    def __init__(self, name: str, nodes: int, rate: str, subnet: str = "10.77.0.0/24") -> None:
        if nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {nodes}")
        self.rate_bits = parse_rate(rate)
        self.rate = rate
        self.name = name
        self.switch = f"{name}-sw"
        self.nodes = [f"{name}-n{i}" for i in range(nodes)]
        self.addresses = _node_addresses(subnet, nodes)
        self._created: list[str] = []

    def create(self) -> None:
        """Build namespaces, bridge, veths, addresses and shaping; undo all of it on failure."""
        try:
            self._add_namespace(self.switch)
            _run(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"], "creating the bridge")
            _run(["ip", "-n", self.switch, "link", "set", "br0", "up"], "bringing up the bridge")
            prefix = self.addresses[0].network.prefixlen
            for i, (node, address) in enumerate(zip(self.nodes, self.addresses)):
                port = f"n{i}"
                self._add_namespace(node)
                _run(["ip", "-n", self.switch, "link", "add", port, "type", "veth",
                      "peer", "name", NODE_IFNAME, "netns", node], f"creating the veth of {node}")
                _run(["ip", "-n", self.switch, "link", "set", port, "master", "br0", "up"],
                     f"attaching {port} to the bridge")
                _run(["ip", "-n", node, "addr", "add", f"{address.ip}/{prefix}", "dev", NODE_IFNAME],
                     f"addressing {node}")
                _run(["ip", "-n", node, "link", "set", NODE_IFNAME, "up"], f"bringing up {node}'s link")
                _run(["ip", "-n", node, "link", "set", "lo", "up"], f"bringing up {node}'s loopback")
                self._shape(node, NODE_IFNAME)
                self._shape(self.switch, port)
        except BaseException:
            self.destroy()
            raise

    def _add_namespace(self, namespace: str) -> None:
        _run(["ip", "netns", "add", namespace], f"creating network namespace {namespace}")
        self._created.append(namespace)

    def _shape(self, namespace: str, ifname: str) -> None:
        # A bucket of ~4 ms of traffic (at least 128 KiB, so GSO super-packets pass whole) keeps
        # the long-run rate exact while letting TCP fill the pipe; 50 ms of queue avoids drops.
        burst = max(self.rate_bits // 8 // 250, 128 * 1024)
        _run(["tc", "-n", namespace, "qdisc", "replace", "dev", ifname, "root", "tbf",
              "rate", f"{self.rate_bits}bit", "burst", str(burst), "latency", "50ms"],
             f"shaping {ifname} in {namespace} to {self.rate} (is the sch_tbf module available?)")

    @property
    def created(self) -> bool:
        return len(self._created) == len(self.nodes) + 1

    def set_link(self, node: int, up: bool) -> None:
        """Cut (``up=False``) or restore node ``node``'s link: its switch port goes down or up."""
        if not 0 <= node < len(self.nodes):
            raise ValueError(f"node must be in 0..{len(self.nodes) - 1}, got {node}")
        if not self.created:
            raise ClusterError("the cluster's namespaces do not exist: links can only be cut while it is up")
        state = "up" if up else "down"
        _run(["ip", "-n", self.switch, "link", "set", f"n{node}", state], f"setting node {node}'s link {state}")

    def destroy(self) -> None:
        """Delete every namespace this topology created (nodes first, then the switch)."""
        for namespace in reversed(self._created):
            delete_namespace(namespace)
        self._created.clear()

    def counters(self) -> list[LinkCounters]:
        """Current byte counters of every node, read from inside its namespace."""
        return [_read_counters(node) for node in self.nodes]


def _node_addresses(subnet: str, nodes: int) -> list[ipaddress.IPv4Interface]:
    """Node addresses with equally many digits, so their string order is their numeric order.

    torchrun's c10d rendezvous ranks nodes by sorting their addresses as strings; this makes
    node i hold global ranks i*M .. i*M+M-1 (group-major, as the PaRO mesh expects).
    """
    try:
        network = ipaddress.IPv4Network(subnet)
    except ValueError as e:
        raise ValueError(f"invalid subnet {subnet!r}: {e}") from None
    hosts = list(network.hosts())
    width = len(str(hosts[-1])) if hosts else 0
    same_width = [h for h in hosts if len(str(h)) == width]
    if len(same_width) < nodes:
        raise ValueError(f"subnet {subnet} has too few addresses for {nodes} nodes; use a larger one "
                         f"(e.g. 10.77.0.0/24)")
    return [ipaddress.IPv4Interface(f"{h}/{network.prefixlen}") for h in same_width[:nodes]]


def _read_counters(namespace: str) -> LinkCounters:
    out = _run(["ip", "-n", namespace, "-j", "-s", "link", "show"], f"reading counters of {namespace}")
    stats = {link["ifname"]: link["stats64"] for link in json.loads(out)}
    eth, lo = stats[NODE_IFNAME], stats["lo"]
    return LinkCounters(tx=eth["tx"]["bytes"], rx=eth["rx"]["bytes"], loopback=lo["tx"]["bytes"])
