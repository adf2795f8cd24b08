"""The user-facing names of the global collectives (``comm=`` / ``parallelism.paro_comm``).

Kept apart from :mod:`paro_fsdp.comm.registry`, which maps them to classes, so that the
classes can carry their own name without importing the registry that imports them.
"""

DEFAULT = "default"
"""Two-phase hierarchical collectives: the inter-group phase, then the intra-group phase."""

HO_RING = "ho_ring"
"""Hierarchical overlapping rings: the two phases pipelined chunk by chunk."""

AUTO = "auto"
"""Not collectives but a request to the planner: choose, per job, between :data:`DEFAULT` and
:data:`HO_RING` and HO-Ring's depth (``paro_fsdp.planner.choose_collectives``)."""

PLANNER_COMM_NAMES: tuple[str, ...] = (DEFAULT, HO_RING, AUTO)
"""What the planner's ``comm`` (``paro plan --comm``, ``parallelism.paro_comm``) takes."""
