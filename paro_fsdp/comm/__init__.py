"""PaRO-CC: collectives over a 2D (dp_replicate x dp_shard) mesh.

``all_gather`` / ``reduce_scatter`` / ``all_reduce`` give the flat collective over the flattened
mesh with HO-Ring (intra and inter phases overlapped); ``use_ho_ring`` opts a plain
``fully_shard`` model into them; ``ho_ring_process_group`` is a drop-in ``ProcessGroup`` that
runs them for code that only takes a group (DTensor, ``DeviceMesh.from_group``).
"""

from paro_fsdp.comm.fsdp import CollectivesAllGather, CollectivesReduceScatter, set_collectives, use_ho_ring
from paro_fsdp.comm.groups import MeshGroups
from paro_fsdp.comm.hierarchical import HierarchicalCollectives
from paro_fsdp.comm.ho_ring import (
    HORingCollectives,
    HORingWork,
    all_gather,
    all_reduce,
    collectives_for,
    reduce_scatter,
)
from paro_fsdp.comm.process_group import HORingProcessGroup, ho_ring_process_group
from paro_fsdp.comm.stats import CommStats, phase

__all__ = [
    "CollectivesAllGather",
    "CollectivesReduceScatter",
    "CommStats",
    "HORingCollectives",
    "HORingProcessGroup",
    "HORingWork",
    "HierarchicalCollectives",
    "MeshGroups",
    "all_gather",
    "all_reduce",
    "collectives_for",
    "ho_ring_process_group",
    "phase",
    "reduce_scatter",
    "set_collectives",
    "use_ho_ring",
]
