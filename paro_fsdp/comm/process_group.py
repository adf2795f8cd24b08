"""A ``ProcessGroup`` over the flattened 2D mesh whose global collectives run HO-Ring.

Code that only accepts a process group (FSDP2 through ``DeviceMesh.from_group``, DTensor
redistribution, user code calling ``torch.distributed``) gets HO-Ring by being handed this
group: all-gather, reduce-scatter and SUM/AVG all-reduce (single-tensor, coalesced, and the
forms functional collectives call) run HO-Ring; every other operation, and reductions HO-Ring
does not support (MAX, PREMUL_SUM, ...), go to the wrapped flat group, whose rank order is the
same. The group is created through the c10d backend registry, so it has a registered name that
functional collectives resolve, and rank mappings that ``dist.get_rank(group)`` and friends use.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from paro_fsdp.comm.groups import per_mesh
from paro_fsdp.comm.ho_ring import HORingCollectives, HORingWork, collectives_for, supports_reduction
from paro_fsdp.comm.torch_compat import new_group_in_order

BACKEND = "paro_ho_ring"

# Operations that go to the wrapped group unchanged (names of ``dist.ProcessGroup`` methods).
_DELEGATED = (
    "_get_backend", "abort", "allgather", "allgather_coalesced", "allreduce_coalesced", "alltoall",
    "alltoall_base", "all_to_all_single", "barrier", "broadcast", "gather", "monitored_barrier",
    "recv", "recv_anysource", "reduce", "reduce_scatter", "scatter", "send", "set_timeout",
)


def _all_of(works: list[HORingWork | None], result: list[torch.Tensor]) -> HORingWork:
    def finish() -> None:
        for work in works:
            if work is not None:
                work.wait()
    return HORingWork(finish, result)


class HORingProcessGroup(dist.ProcessGroup):
    """``wrapped`` (the flat group of all n ranks, group-major) with HO-Ring global collectives.

    Build it with :func:`ho_ring_process_group`, which registers it with c10d.
    """

    def __init__(self, collectives: HORingCollectives, wrapped: dist.ProcessGroup) -> None:
        super().__init__(wrapped.rank(), wrapped.size())
        self.collectives = collectives
        self.wrapped = wrapped
        self._name = ""
        self._desc = ""

    # c10d keeps these on the backends, and this group has none of its own.

    def _set_group_name(self, name: str) -> None:
        self._name = name

    @property
    def group_name(self) -> str:
        return self._name

    def _set_group_desc(self, desc: str) -> None:
        self._desc = desc

    @property
    def group_desc(self) -> str:
        return self._desc

    def getBackendName(self) -> str:  # noqa: N802 - c10d's name
        return BACKEND

    def __repr__(self) -> str:
        return f"HORingProcessGroup(rank={self.rank()}, size={self.size()}, wrapped={self.wrapped!r})"

    # All-gather: every form lands on HORingCollectives.all_gather.

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor,
                          opts: dist.AllgatherOptions | None = None) -> HORingWork:
        return self.collectives.all_gather(output, input, async_op=True)

    _allgather_base = all_gather_single

    def allgather_into_tensor_coalesced(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor],
                                        opts: dist.AllgatherOptions | None = None) -> HORingWork:
        works = [self.collectives.all_gather(o, i, async_op=True) for o, i in zip(outputs, inputs, strict=True)]
        return _all_of(works, outputs)

    all_gather_single_coalesced = allgather_into_tensor_coalesced

    # Reduce-scatter and all-reduce: SUM and AVG run HO-Ring, other reductions the wrapped group.

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor,
                              opts: dist.ReduceScatterOptions | None = None) -> dist.Work:
        opts = opts or dist.ReduceScatterOptions()
        if not supports_reduction(opts.reduceOp, output.dtype):
            return self.wrapped._reduce_scatter_base(output, input, opts)
        return self.collectives.reduce_scatter(output, input, opts.reduceOp, async_op=True)

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_tensor_coalesced(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor],
                                        opts: dist.ReduceScatterOptions | None = None) -> dist.Work:
        opts = opts or dist.ReduceScatterOptions()
        if not all(supports_reduction(opts.reduceOp, o.dtype) for o in outputs):
            return self.wrapped.reduce_scatter_tensor_coalesced(outputs, inputs, opts)
        works = [self.collectives.reduce_scatter(o, i, opts.reduceOp, async_op=True)
                 for o, i in zip(outputs, inputs, strict=True)]
        return _all_of(works, outputs)

    reduce_scatter_single_coalesced = reduce_scatter_tensor_coalesced

    def allreduce(self, tensors: list[torch.Tensor] | torch.Tensor, opts: Any = None) -> dist.Work:
        # c10d binds allreduce(tensors, opts), allreduce(tensors, op) and allreduce(tensor, op).
        tensor_list = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        if opts is None:
            op = dist.ReduceOp.SUM
        elif isinstance(opts, dist.AllreduceOptions):
            op = opts.reduceOp
        else:
            op = opts
        if not all(supports_reduction(op, t.dtype) and t.is_contiguous() for t in tensor_list):
            return self.wrapped.allreduce(tensors) if opts is None else self.wrapped.allreduce(tensors, opts)
        works = [self.collectives.all_reduce(t, op, async_op=True) for t in tensor_list]
        return _all_of(works, tensor_list)


def _delegate(name: str) -> Callable[..., Any]:
    def method(self: HORingProcessGroup, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.wrapped, name)(*args, **kwargs)
    method.__name__ = name
    method.__doc__ = f"``{name}`` of the wrapped flat group."
    return method


for _name in _DELEGATED:
    setattr(HORingProcessGroup, _name, _delegate(_name))


# c10d creates registered groups through a backend plugin; the plugin hands back the group
# being built, which only this module's factory sets (on the calling thread).
_building = threading.local()
_registered_devices: set[str] = set()
_lock = threading.RLock()


def _create(store: Any, rank: int, size: int, timeout: Any) -> HORingProcessGroup:
    pg = getattr(_building, "group", None)
    if pg is None or (pg.rank(), pg.size()) != (rank, size):
        raise RuntimeError(f"backend {BACKEND!r} groups are created by paro_fsdp.comm.ho_ring_process_group(mesh), "
                           "not by init_process_group / new_group")
    return pg


def _register_backend(device_type: str) -> None:
    if device_type not in _registered_devices:
        _registered_devices.add(device_type)
        dist.Backend.register_backend(BACKEND, _create, devices=sorted(_registered_devices))


def ho_ring_process_group(mesh: DeviceMesh) -> HORingProcessGroup:
    """The HO-Ring process group of the 2D (dp_replicate, dp_shard) ``mesh``, one per mesh.

    Collective over the mesh's ranks on first use (call it in the same order on all of them).
    Use it wherever a flat data-parallel group is expected, for example
    ``fully_shard(module, mesh=DeviceMesh.from_group(group, device_type))``. Its byte counts
    are in ``group.collectives.groups.stats``.
    """
    with _lock:
        return per_mesh(mesh, "ho_ring_process_group", lambda: _new_group(mesh))


def _new_group(mesh: DeviceMesh) -> HORingProcessGroup:
    collectives = collectives_for(mesh)
    flat_mesh = collectives.groups.flat_mesh
    wrapped = flat_mesh.get_group()
    ranks = flat_mesh.mesh.flatten().tolist()
    if dist.get_process_group_ranks(wrapped) != ranks:
        raise ValueError(f"the flattened mesh's group has ranks {dist.get_process_group_ranks(wrapped)}, "
                         f"expected the mesh's group-major order {ranks}")
    _register_backend(mesh.device_type)
    _building.group = HORingProcessGroup(collectives, wrapped)
    try:
        pg = new_group_in_order(ranks, backend=BACKEND, use_local_synchronization=True, group_desc="paro_ho_ring")
    finally:
        built, _building.group = _building.group, None
    if pg is not built:
        raise RuntimeError(f"c10d returned {pg!r} instead of the HO-Ring group for backend {BACKEND!r}")
    return pg
