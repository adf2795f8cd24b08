"""HO-Ring (PaRO-CC): global collectives over a 2D mesh with overlapped intra and inter phases.

A flat ring over all n ranks crosses each group boundary on one link, so most ranks'
inter-group capacity idles. HO-Ring runs the inter-group phase as m concurrent rings (one per
local index, i.e. collectives over the ``dp_replicate`` group, which every rank belongs to) and
the intra-group phase inside each group, and cuts the data into chunks so the intra phase of
chunk k runs while the inter phase of chunk k+1 is on the wire. Results equal the flat
collective over the flattened mesh (flat rank ``group_index * m + local_index``); each rank
sends (g-1)/n of the data across groups.

Overlap comes from issuing every phase as an asynchronous collective: the intra and inter
process groups progress independently (NCCL: one internal stream per communicator; gloo:
background threads per group). A side stream orders the phases through ``Work.wait()`` so the
caller's stream is only joined at the end; on devices without streams the stream calls are
no-ops and ``Work.wait()`` blocks the host instead. Every collective is issued during the call,
in program order, so concurrent operations match across ranks whatever order they are waited in.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from paro_fsdp.comm.groups import MeshGroups, Pending, per_mesh
from paro_fsdp.comm.names import HO_RING
from paro_fsdp.comm.stats import INTER, INTRA
from paro_fsdp.comm.streams import keep_for_current_stream

ReduceOpLike = dist.ReduceOp | dist.ReduceOp.RedOpType

# Pipeline depth: measured on the emulated cluster (2x4, 250 mbit, 64 MiB), 16 chunks keep the
# inter-node link 86-87% busy against 72-78% with 4 (docs/collectives-benchmark.md); chunks
# under 1 MiB cost more in per-collective latency than the overlap gains.
DEFAULT_CHUNKS = 16
DEFAULT_MIN_CHUNK_BYTES = 1 << 20
HO_RING_DEPTHS = (2, 4, 8, 16)
"""The depths the planner chooses among with ``comm="auto"``: the measured range
(``docs/ho-ring-depth.md``: 4 best from 1 gbit up, 16 best at 250 mbit)."""


def supports_reduction(op: ReduceOpLike, dtype: torch.dtype) -> bool:
    """Whether HO-Ring can reduce ``dtype`` with ``op`` (SUM, or AVG of floating-point data)."""
    return op == dist.ReduceOp.SUM or (op == dist.ReduceOp.AVG and (dtype.is_floating_point or dtype.is_complex))


def _check_op(op: ReduceOpLike, dtype: torch.dtype, what: str) -> bool:
    """Whether ``op`` is AVG (else SUM); anything else is rejected."""
    if supports_reduction(op, dtype):
        return op == dist.ReduceOp.AVG
    if op == dist.ReduceOp.AVG:
        raise ValueError(f"HO-Ring {what} with ReduceOp.AVG needs a floating-point tensor, got {dtype}")
    raise ValueError(
        f"HO-Ring {what} supports ReduceOp.SUM and ReduceOp.AVG, got {op}; "
        "for PREMUL_SUM (FSDP with set_gradient_divide_factor) use "
        "set_force_sum_reduction_for_comms(True) or the default divide factor"
    )


def _check_same(a: torch.Tensor, b: torch.Tensor, names: str) -> None:
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"HO-Ring {names} must share dtype and device, got "
                         f"{a.dtype}/{a.device} and {b.dtype}/{b.device}")


class HORingWork(dist.Work):
    """Handle of an asynchronous HO-Ring collective (a real ``dist.Work`` for FSDP and c10d).

    ``wait()`` runs the phases that follow the inter-group one on the collectives' side stream
    and makes the current stream wait for them; as it issues collectives, every rank must wait
    for its handles in the same order. It also hands other collectives' deferred completions
    to FSDP2, which only waits on a ``dist.Work``.
    """

    def __init__(self, finish: Callable[[], None], result: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self._finish: Callable[[], None] | None = finish
        self._error: BaseException | None = None
        self._result = list(result)
        self._lock = threading.Lock()

    def wait(self, timeout: timedelta | None = None) -> bool:
        with self._lock:
            if self._finish is not None:
                finish, self._finish = self._finish, None
                try:
                    finish()
                except BaseException as error:
                    self._error = error
            if self._error is not None:
                raise self._error
        return True

    def is_completed(self) -> bool:
        return self._finish is None

    def result(self) -> list[torch.Tensor]:
        return self._result

    def get_future(self) -> torch.futures.Future:
        self.wait()
        future: torch.futures.Future = torch.futures.Future()
        future.set_result(self._result)
        return future


def _single(pending: Pending, async_op: bool, result: torch.Tensor) -> HORingWork | None:
    """A degenerate mesh's one-link collective, with HO-Ring's return convention."""
    if async_op:
        return HORingWork(pending.wait, [result])
    pending.wait()
    return None


def pipeline_depth(total_bytes: float, chunks: int = DEFAULT_CHUNKS,
                   min_chunk_bytes: int = DEFAULT_MIN_CHUNK_BYTES) -> int:
    """How many chunks HO-Ring cuts a collective of ``total_bytes`` into: at most ``chunks``, each
    of at least ``min_chunk_bytes`` (0: no minimum), and at least one."""
    by_size = int(total_bytes // min_chunk_bytes) if min_chunk_bytes else chunks
    return min(chunks, max(1, by_size))


def check_chunks(chunks: object, field: str = "chunks") -> int:
    """``chunks`` if it is a valid pipeline depth (a positive int), else a ``ValueError`` naming ``field``."""
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"{field}={chunks!r} is invalid: HO-Ring's pipeline depth is a positive int "
                         f"(default {DEFAULT_CHUNKS})")
    return chunks


def _chunk_bounds(units: int, unit: int, chunks: int) -> list[tuple[int, int]]:
    """Split ``units`` blocks of ``unit`` elements into at most ``chunks`` contiguous element ranges."""
    if units == 0:
        return []
    chunks = max(1, min(chunks, units))
    edges = [i * units // chunks * unit for i in range(chunks + 1)]
    return list(zip(edges[:-1], edges[1:]))


class HORingCollectives:
    """Flat-semantics global all-gather / reduce-scatter / all-reduce with HO-Ring.

    ``chunks`` is the pipeline depth; a collective uses fewer when a chunk would carry less than
    ``min_chunk_bytes`` (per-collective latency then outweighs the overlap). Same interface as
    :class:`~paro_fsdp.comm.hierarchical.HierarchicalCollectives`, plus ``async_op``.
    """

    name = HO_RING

    def __init__(self, groups: MeshGroups, chunks: int = DEFAULT_CHUNKS,
                 min_chunk_bytes: int = DEFAULT_MIN_CHUNK_BYTES) -> None:
        check_chunks(chunks)
        if not isinstance(min_chunk_bytes, int) or min_chunk_bytes < 0:
            raise ValueError(f"min_chunk_bytes must be a non-negative int, got {min_chunk_bytes!r}")
        self.groups = groups
        self.chunks = chunks
        self.min_chunk_bytes = min_chunk_bytes
        self._device_module = torch.get_device_module(groups.device.type)
        self._stream = None

    def _bounds(self, units: int, unit: int, total_bytes: int) -> list[tuple[int, int]]:
        return _chunk_bounds(units, unit, pipeline_depth(total_bytes, self.chunks, self.min_chunk_bytes))

    def _run(self, issue: Callable[[], Callable[[], None]], async_op: bool,
             result: Sequence[torch.Tensor], operands: Sequence[torch.Tensor]) -> HORingWork | None:
        """Issue the collectives on the side stream; finish now or at ``wait()``.

        ``issue`` starts every phase up to the inter-group one and returns ``finish``, which
        starts the intra-group phases that read the inter-group results, chunk by chunk as
        each arrives (that is the overlap), and waits. So with ``async_op`` the inter-group
        phase is in flight while the caller computes, and every rank must wait for its
        handles in the same order.

        ``operands`` (the caller's input and output) are recorded on the side stream: a caller
        may drop its input as soon as the call returns (the engine hands over FSDP2's reduce
        buffer), and the allocator must not give that memory to its stream's next tensor
        before the side stream has read it.
        """
        dm = self._device_module
        if self._stream is None:
            self._stream = dm.Stream()
        side = self._stream
        caller = dm.current_stream()
        side.wait_stream(caller)
        with dm.stream(side):
            finish = issue()
            for tensor in operands:
                keep_for_current_stream(tensor)
        context = contextvars.copy_context()  # the phases started at wait() count under the issuing phase

        def complete() -> None:
            with dm.stream(side):
                context.run(finish)
            dm.current_stream().wait_stream(side)

        if async_op:
            return HORingWork(complete, result)
        complete()
        return None

    def all_gather(self, output: torch.Tensor, input: torch.Tensor, *,
                   async_op: bool = False) -> HORingWork | None:
        """``output[r*S:(r+1)*S]`` = ``input`` of flat rank r, for S = ``input.numel()``.

        ``input`` may alias that slice of ``output`` (FSDP's in-place all-gather).
        """
        groups = self.groups
        g, m, s = groups.groups, groups.group_size, input.numel()
        _check_same(output, input, "all_gather output and input")
        if output.numel() != g * m * s or not output.is_contiguous():
            raise ValueError(f"all_gather output must be contiguous with {g * m} x {s} elements "
                             f"(world x input), got shape {tuple(output.shape)}")
        if (link := groups.single_link) is not None:
            return _single(groups.start_all_gather(output.view(-1), input.reshape(-1), link), async_op, output)
        src = input.reshape(-1)
        out = output.view(g, m, s)

        def issue() -> Callable[[], None]:
            bounds = self._bounds(s, 1, output.numel() * output.element_size())
            inter = []
            for a, b in bounds:
                column = src.new_empty(g * (b - a))
                inter.append((column, groups.start_all_gather(column, src[a:b], INTER)))

            def finish() -> None:
                intra = []
                for (a, b), (column, step) in zip(bounds, inter):
                    step.wait()
                    intra.append(groups.start_all_gather_columns(out[:, :, a:b], column))
                for step in intra:
                    step.wait()
            return finish

        return self._run(issue, async_op, [output], (output, input))

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor,
                       op: ReduceOpLike = dist.ReduceOp.SUM, *,
                       async_op: bool = False) -> HORingWork | None:
        """``output`` = reduction over ranks of ``input[r*S:(r+1)*S]``, r this flat rank."""
        groups = self.groups
        g, m, s = groups.groups, groups.group_size, output.numel()
        _check_same(output, input, "reduce_scatter output and input")
        average = _check_op(op, output.dtype, "reduce_scatter")
        if input.numel() != g * m * s or not output.is_contiguous():
            raise ValueError(f"reduce_scatter needs a contiguous output and an input of {g * m} x "
                             f"output.numel() = {g * m * s} elements, got {input.numel()}")
        if (link := groups.single_link) is not None:
            return _single(groups.start_reduce_scatter(output.view(-1), input.reshape(-1), link, op), async_op,
                           output)
        by_rank = input.reshape(g, m, s)
        out = output.view(-1)

        def issue() -> Callable[[], None]:
            bounds = self._bounds(s, 1, input.numel() * input.element_size())
            intra = []
            for a, b in bounds:
                column = out.new_empty(g * (b - a))
                intra.append((column, groups.start_reduce_scatter_columns(column, by_rank[:, :, a:b])))
            inter = []
            for (a, b), (column, step) in zip(bounds, intra):
                step.wait()
                inter.append(groups.start_reduce_scatter(out[a:b], column, INTER))

            def finish() -> None:
                for step in inter:
                    step.wait()
                if average:
                    out.div_(g * m)
            return finish

        return self._run(issue, async_op, [output], (output, input))

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOpLike = dist.ReduceOp.SUM, *,
                   async_op: bool = False) -> HORingWork | None:
        """In-place all-reduce over all n ranks: per chunk, intra reduce-scatter, inter
        all-reduce of the 1/m piece, intra all-gather (chunk k's intra phases overlap
        chunk k±1's inter phase)."""
        groups = self.groups
        m, n = groups.group_size, groups.world
        average = _check_op(op, tensor.dtype, "all_reduce")
        if not tensor.is_contiguous():
            raise ValueError("HO-Ring all_reduce works in place and needs a contiguous tensor")
        if (link := groups.single_link) is not None:
            return _single(groups.start_all_reduce(tensor, link, op), async_op, tensor)
        flat = tensor.view(-1)
        total = flat.numel()

        def issue() -> Callable[[], None]:
            padded = -(-total // n) * n  # every chunk splits evenly over m, then over g
            work = flat if padded == total else torch.cat([flat, flat.new_zeros(padded - total)])
            bounds = self._bounds(padded // n, n, padded * flat.element_size())
            reduce = []
            for a, b in bounds:
                piece = work.new_empty((b - a) // m)
                reduce.append((piece, groups.start_reduce_scatter(piece, work[a:b], INTRA)))
            across = []
            for piece, step in reduce:
                step.wait()
                across.append((piece, groups.start_all_reduce(piece, INTER)))

            def finish() -> None:
                gather = []
                for (a, b), (piece, step) in zip(bounds, across):
                    step.wait()
                    gather.append(groups.start_all_gather(work[a:b], piece, INTRA))
                for step in gather:
                    step.wait()
                if work is not flat:
                    flat.copy_(work[:total])
                if average:
                    flat.div_(n)
            return finish

        return self._run(issue, async_op, [tensor], (tensor,))


_BY_MESH_LOCK = threading.Lock()


def collectives_for(mesh: DeviceMesh) -> HORingCollectives:
    """The HO-Ring collectives of ``mesh``, created once per mesh (its byte counts in ``.groups.stats``)."""
    with _BY_MESH_LOCK:
        return per_mesh(mesh, "ho_ring", lambda: HORingCollectives(MeshGroups(mesh)))


def all_gather(output: torch.Tensor, input: torch.Tensor, mesh: DeviceMesh, *,
               async_op: bool = False) -> HORingWork | None:
    """Flat all-gather over the flattened 2D (dp_replicate, dp_shard) ``mesh``, done with HO-Ring."""
    return collectives_for(mesh).all_gather(output, input, async_op=async_op)


def reduce_scatter(output: torch.Tensor, input: torch.Tensor, mesh: DeviceMesh,
                   op: ReduceOpLike = dist.ReduceOp.SUM, *, async_op: bool = False) -> HORingWork | None:
    """Flat reduce-scatter (SUM or AVG) over the flattened 2D ``mesh``, done with HO-Ring."""
    return collectives_for(mesh).reduce_scatter(output, input, op, async_op=async_op)


def all_reduce(tensor: torch.Tensor, mesh: DeviceMesh, op: ReduceOpLike = dist.ReduceOp.SUM, *,
               async_op: bool = False) -> HORingWork | None:
    """In-place all-reduce (SUM or AVG) over the flattened 2D ``mesh``, done with HO-Ring."""
    return collectives_for(mesh).all_reduce(tensor, op, async_op=async_op)
