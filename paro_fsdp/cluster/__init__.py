"""An emulated two-level cluster on one machine: K network namespaces ("nodes") on a bridge.

Each node runs ``torchrun`` with M ranks; traffic between ranks of one node stays on the node's
loopback, traffic between nodes crosses the node's veth, shaped to a given rate. Per-node byte
counters of both make the inter- and intra-node volume of any collective measurable.
Command line: ``python -m paro_fsdp.cluster --help``.
"""

from paro_fsdp.cluster.counters import node_counters
from paro_fsdp.cluster.launch import ClusterResult, EmulatedCluster, LinkEvent, LinkFault, NodeResult, run
from paro_fsdp.cluster.network import (
    ClusterError,
    ClusterPermissionError,
    LinkCounters,
    cleanup_namespaces,
    missing_requirements,
    parse_rate,
)

__all__ = [
    "ClusterError", "ClusterPermissionError", "ClusterResult", "EmulatedCluster", "LinkCounters",
    "LinkEvent", "LinkFault", "NodeResult", "cleanup_namespaces", "missing_requirements", "node_counters",
    "parse_rate", "run",
]
