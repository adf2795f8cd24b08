"""Byte counters of the node's link, read from inside a script running on the emulated cluster.

A rank reads its node's counters (shared by all ranks of the node) around a collective to
measure what that collective put on the inter-node link.
"""

from __future__ import annotations

import os

from paro_fsdp.cluster.launch import ENV_IFNAME
from paro_fsdp.cluster.network import LinkCounters


def _read(ifname: str, counter: str) -> int:
    with open(f"/sys/class/net/{ifname}/statistics/{counter}") as f:
        return int(f.read())


def node_counters() -> LinkCounters:
    """This node's link and loopback byte counters (``PARO_CLUSTER_IFNAME``, set by the cluster)."""
    ifname = os.environ.get(ENV_IFNAME)
    if ifname is None:
        raise RuntimeError(f"{ENV_IFNAME} is not set: node_counters() only works in a script launched "
                           f"by `python -m paro_fsdp.cluster`")
    return LinkCounters(tx=_read(ifname, "tx_bytes"), rx=_read(ifname, "rx_bytes"),
                        loopback=_read("lo", "tx_bytes"))
