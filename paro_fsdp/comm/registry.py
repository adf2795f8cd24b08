"""The global collectives a user can select by name, and what each name builds.

Everything that accepts ``comm=`` (``paro_parallelize``, the planner, ``paro plan``, torchtitan's
``parallelism.paro_comm``, the benchmarks) validates and resolves it here.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist

from paro_fsdp.comm.groups import MeshGroups
from paro_fsdp.comm.hierarchical import HierarchicalCollectives
from paro_fsdp.comm.ho_ring import HORingCollectives, check_chunks
from paro_fsdp.comm.names import DEFAULT, HO_RING

__all__ = ["COMM_NAMES", "DEFAULT", "HO_RING", "Collectives", "check_comm", "check_ho_ring_chunks",
           "make_collectives"]


class Waitable(Protocol):
    def wait(self) -> object: ...


class Collectives(Protocol):
    """Global collectives over the 2D mesh with flat (group-major) semantics.

    With ``async_op=True`` each returns a handle whose ``wait()`` completes it (handles must be
    waited in the same order on every rank); otherwise it completes before returning.
    """

    groups: MeshGroups
    name: str

    def all_gather(self, output: torch.Tensor, input: torch.Tensor, *,
                   async_op: bool = False) -> Waitable | None: ...
    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor,
                       op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM, *,
                       async_op: bool = False) -> Waitable | None: ...
    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM, *,
                   async_op: bool = False) -> Waitable | None: ...


_CLASSES: dict[str, type] = {DEFAULT: HierarchicalCollectives, HO_RING: HORingCollectives}

COMM_NAMES: tuple[str, ...] = tuple(_CLASSES)
"""The valid ``comm`` values, the default first."""


def check_comm(name: str, field: str = "comm") -> str:
    """Validate a collectives name.

    Args:
        name: the value to check.
        field: how the caller's user spells the setting (``"comm"``,
            ``"parallelism.paro_comm"``), so that the error points at what to change.

    Returns:
        ``name``, unchanged.

    Raises:
        ValueError: ``name`` is not one of :data:`COMM_NAMES`; the message names ``field``,
            the value and the valid names.
    """
    if name not in _CLASSES:
        raise ValueError(f"{field}={name!r} is invalid; valid values: {', '.join(COMM_NAMES)}")
    return name


def check_ho_ring_chunks(chunks: int | None, comm: str, field: str = "ho_ring_chunks",
                         comm_field: str = "comm") -> int | None:
    """Validate HO-Ring's pipeline depth for the collectives ``comm``.

    Args:
        chunks: the depth, or ``None`` for HO-Ring's default.
        comm: the collectives it would apply to; a depth needs ``"ho_ring"``.
        field, comm_field: how the caller's user spells both settings.

    Returns:
        ``chunks``, unchanged.

    Raises:
        ValueError: ``chunks`` is not ``None`` or a positive int, or is set with other collectives
            than HO-Ring (which would silently ignore it).
    """
    if chunks is None:
        return None
    check_chunks(chunks, field)
    if comm != HO_RING:
        raise ValueError(f"{field}={chunks} is HO-Ring's pipeline depth, valid only with {comm_field}={HO_RING!r}, "
                         f"but {comm_field}={comm!r}: set {comm_field}={HO_RING!r}, or leave {field} unset")
    return chunks


def make_collectives(name: str, groups: MeshGroups, *, ho_ring_chunks: int | None = None) -> Collectives:
    """Build the global collectives called ``name`` over ``groups``' mesh.

    Args:
        name: one of :data:`COMM_NAMES`.
        groups: the process groups of the (dp_replicate, dp_shard) mesh the collectives span.
        ho_ring_chunks: with ``"ho_ring"``, its pipeline depth (at most this many chunks per
            collective); ``None``: its default.

    Returns:
        The collectives object.

    Raises:
        ValueError: ``name`` or ``ho_ring_chunks`` is invalid (see :func:`check_comm` and
            :func:`check_ho_ring_chunks`).
    """
    check_comm(name)
    if check_ho_ring_chunks(ho_ring_chunks, name) is not None:
        return HORingCollectives(groups, chunks=ho_ring_chunks)
    return _CLASSES[name](groups)
