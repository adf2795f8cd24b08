"""Process groups of a 2D (dp_replicate x dp_shard) mesh and byte-counted collectives on them.

``intra`` is the group a rank shares fast links with (its ``dp_shard`` row); ``inter`` joins
the ranks with the same local index across groups (its ``dp_replicate`` column). Every
collective here runs over one of those and records the bytes it sends in ``stats``. With
``quant`` set, the inter-group collectives of the training phases it names send block-quantized
data (:mod:`paro_fsdp.comm.quant`); intra-group ones always stay exact.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from paro_fsdp.comm import quant as q
from paro_fsdp.comm.errors import CollectiveError, Issued, adopt_default_timeout
from paro_fsdp.comm.relay import Relay, StreamRelay, ThreadRelay
from paro_fsdp.comm.streams import keep_for_current_stream
from paro_fsdp.comm.stats import INTER, INTRA, CommStats, current_phase
from paro_fsdp.comm.torch_compat import all_gather_single, reduce_scatter_single

T = TypeVar("T")
REPLICATE_DIM = "dp_replicate"
SHARD_DIM = "dp_shard"


def validate_mesh(mesh: object) -> DeviceMesh:
    """Check that ``mesh`` is the 2D (dp_replicate, dp_shard) data-parallel mesh."""
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a torch.distributed DeviceMesh, got {type(mesh).__name__}")
    names = tuple(mesh.mesh_dim_names or ())
    if mesh.ndim != 2 or names != (REPLICATE_DIM, SHARD_DIM):
        raise ValueError(
            f"mesh must be 2D with mesh_dim_names=({REPLICATE_DIM!r}, {SHARD_DIM!r}) "
            f"(groups x ranks per group), got ndim={mesh.ndim} and names={names or None}; build it with "
            f"init_device_mesh(device_type, (groups, ranks_per_group), "
            f"mesh_dim_names=({REPLICATE_DIM!r}, {SHARD_DIM!r})) or slice it out of a larger mesh"
        )
    return mesh


def _uses_gloo(group: dist.ProcessGroup) -> bool:
    try:
        return dist.get_backend(group) == "gloo"
    except (RuntimeError, ValueError):
        return False


class _MeshCache(dict):
    """Values kept on one mesh object (pickled empty: they hold process groups)."""

    def __reduce__(self) -> tuple:
        return (_MeshCache, ())


def per_mesh(mesh: DeviceMesh, key: str, build: Callable[[], T]) -> T:
    """The value ``build()`` made once for this mesh object, kept on the mesh.

    It goes when the mesh goes, and a mesh that compares equal but holds other process groups
    (a re-initialized world) builds its own: a module-level dict keyed by mesh would do neither.
    """
    cache = mesh.__dict__.get("_paro_cache")
    if cache is None:
        cache = mesh.__dict__["_paro_cache"] = _MeshCache()
    if key not in cache:
        cache[key] = build()
    return cache[key]


class MeshGroups:
    """The intra- and inter-group process groups of a 2D mesh, with counted collectives.

    Ranks are numbered group-major: flat rank ``r = group_index * m + local_index``.
    """

    def __init__(self, mesh: DeviceMesh, stats: CommStats | None = None,
                 quant: q.InterQuant | None = None) -> None:
        self.mesh = validate_mesh(mesh)
        self.quant = quant
        self.residuals: dict[object, torch.Tensor] = {}  # error feedback (``InterQuant.error_feedback``)
        self.intra = mesh.get_group(SHARD_DIM)
        self.inter = mesh.get_group(REPLICATE_DIM)
        self.groups, self.group_size = mesh.size(0), mesh.size(1)
        self.world = self.groups * self.group_size
        coord = mesh.get_coordinate()
        if coord is None:
            raise ValueError("this rank is not part of the PaRO mesh")
        self.group_index, self.local_index = coord
        self.rank = self.group_index * self.group_size + self.local_index
        self.device = torch.device(mesh.device_type, torch.get_device_module(mesh.device_type).current_device()) \
            if mesh.device_type != "cpu" else torch.device("cpu")
        self.stats = stats if stats is not None else CommStats()
        self._gloo = {INTRA: _uses_gloo(self.intra), INTER: _uses_gloo(self.inter)}
        self._ranks = {link: tuple(dist.get_process_group_ranks(self.group(link))) for link in (INTRA, INTER)}
        adopt_default_timeout([self.intra, self.inter])

    @functools.cached_property
    def flat_mesh(self) -> DeviceMesh:
        """The 1D mesh of all n ranks in group-major order (created on first use, collectively)."""
        flat = self.mesh[REPLICATE_DIM, SHARD_DIM]._flatten("paro_dp")
        adopt_default_timeout([flat.get_group()])
        return flat

    @property
    def single_link(self) -> str | None:
        """The one link a global collective crosses on a degenerate mesh (one group: intra; one
        rank per group: inter), where it is that link's plain collective; ``None`` otherwise."""
        if self.groups == 1:
            return INTRA
        if self.group_size == 1:
            return INTER
        return None

    def group(self, link: str) -> dist.ProcessGroup:
        return self.intra if link == INTRA else self.inter

    def size(self, link: str) -> int:
        return self.group_size if link == INTRA else self.groups

    def index(self, link: str) -> int:
        return self.local_index if link == INTRA else self.group_index

    def _issued(self, collective: str, link: str, purpose: str | None = None,
                group: dist.ProcessGroup | None = None) -> Issued:
        """What a ``start_*`` call issues, for naming it if it fails (phase: the current one)."""
        return Issued(collective, link, self._ranks[link], current_phase(), group or self.group(link), purpose)

    @functools.cached_property
    def _relay(self) -> Relay:
        """What issues the second hop of a quantized inter-group all-reduce (:mod:`.relay`)."""
        if self._gloo[INTER]:
            return ThreadRelay(self._ranks[INTER], dist.get_backend(self.inter))
        return StreamRelay(self.inter, self.device)

    def _quant_format(self, kind: str, link: str) -> str | None:
        """The format a collective ``kind`` on ``link`` sends in now (``None``: exact)."""
        if self.quant is None or link != INTER:
            return None
        return self.quant.format_for(current_phase(), kind)

    # Counted collectives over one link. Sizes must divide evenly; callers pad. The ``start_*``
    # forms issue the collective asynchronously and return what completes it.

    def start_all_gather(self, output: torch.Tensor, input: torch.Tensor, link: str) -> "Pending":
        """Ring all-gather: rank order of ``link``'s group, ``output`` = k * ``input``."""
        k = self.size(link)
        if k == 1:
            output.copy_(input.reshape(-1))
            return Pending(None)
        if (fmt := self._quant_format("all_gather", link)) is not None:
            return self._start_quantized_all_gather(output, input, link, fmt)
        self.stats.add(link, (k - 1) * input.numel() * input.element_size())
        return Pending(all_gather_single(output, input, group=self.group(link), async_op=True),
                       issued=self._issued("all_gather", link))

    def start_reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, link: str,
                             op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> "Pending":
        """Reduce-scatter (SUM or AVG) with ring-optimal traffic ((k-1)/k of ``input`` sent)."""
        k = self.size(link)
        if k == 1:
            output.copy_(input.reshape(-1))
            return Pending(None)
        if (fmt := self._quant_format("reduce_scatter", link)) is not None:
            exchange = self._start_quantized_exchange(input, link, fmt)

            def finish_quantized() -> None:
                output.view(-1).copy_(exchange())
                if op == dist.ReduceOp.AVG:
                    output.div_(k)

            return Pending(None, finish_quantized)
        self.stats.add(link, (k - 1) * output.numel() * output.element_size())
        if not self._gloo[link]:
            return Pending(reduce_scatter_single(output, input, op=op, group=self.group(link), async_op=True),
                           issued=self._issued("reduce_scatter", link))
        # gloo's reduce_scatter_tensor is an all-reduce plus a copy (twice the bytes): exchange
        # the blocks and sum locally instead.
        received = torch.empty_like(input)
        work = dist.all_to_all_single(received, input.contiguous(), group=self.group(link), async_op=True)

        def finish() -> None:
            torch.sum(received.view(k, -1), dim=0, out=output.view(-1))
            if op == dist.ReduceOp.AVG:
                output.div_(k)

        return Pending(work, finish, issued=self._issued("all_to_all", link, "reduce_scatter"))

    def start_all_reduce(self, tensor: torch.Tensor, link: str,
                         op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> "Pending":
        """Ring all-reduce (2(k-1)/k of ``tensor`` sent)."""
        k = self.size(link)
        if k == 1:
            return Pending(None)
        if (fmt := self._quant_format("all_reduce", link)) is not None:
            return self._start_quantized_all_reduce(tensor, link, fmt, op)
        self.stats.add(link, 2 * (k - 1) * tensor.numel() * tensor.element_size() // k)
        if op == dist.ReduceOp.AVG and self._gloo[link]:
            return Pending(dist.all_reduce(tensor, group=self.group(link), async_op=True), lambda: tensor.div_(k),
                           issued=self._issued("all_reduce", link))
        return Pending(dist.all_reduce(tensor, op=op, group=self.group(link), async_op=True),
                       issued=self._issued("all_reduce", link))

    # Quantized forms (inter-group only, see ``quant``): each element crosses the link quantized
    # once per hop; sums are taken in fp32 after dequantization.

    def _start_quantized_all_gather(self, output: torch.Tensor, input: torch.Tensor, link: str,
                                    fmt: str, group: dist.ProcessGroup | None = None) -> "Pending":
        """All-gather of ``input`` quantized (over ``group``: ``link``'s by default); every rank,
        the owner included, writes the dequantized values into ``output``, so all copies agree
        bit for bit."""
        k, numel, block = self.size(link), input.numel(), self.quant.block_size
        group = group or self.group(link)
        packed = q.quantize(input.reshape(1, -1), fmt, block)
        received = packed.new_empty(k, packed.shape[1])
        self.stats.add(link, (k - 1) * packed.numel(), quantized=True)
        work = all_gather_single(received, packed, group=group, async_op=True)

        def finish() -> None:
            output.view(k, numel).copy_(q.dequantize(received, numel, fmt, block))

        return Pending(work, finish, issued=self._issued("all_gather", link, f"{fmt} all_gather", group))

    def _start_quantized_exchange(self, input: torch.Tensor, link: str, fmt: str) -> Callable[[], torch.Tensor]:
        """Issue the all-to-all of ``input``'s k chunks, quantized; the returned call waits for it
        and gives the fp32 sum of the chunks this rank owns (its own taken exactly)."""
        k, block, own = self.size(link), self.quant.block_size, self.index(link)
        rows = input.reshape(k, -1)
        key = q.current_feedback_key() if self.quant.error_feedback else None
        if key is None:
            packed = q.quantize(rows, fmt, block)
        else:  # send what was left out last time too; keep what is left out now (own row: exact)
            residual = self.residuals.get(key)
            if residual is None or residual.shape != rows.shape:
                residual = self.residuals[key] = rows.new_zeros(rows.shape, dtype=torch.float32)
            corrected = residual.add_(rows)
            packed = q.quantize(corrected, fmt, block)
            corrected.sub_(q.dequantize(packed, rows.shape[1], fmt, block))
            corrected[own] = 0
        received = torch.empty_like(packed)
        self.stats.add(link, (k - 1) * packed.shape[1], quantized=True)
        pending = Pending(dist.all_to_all_single(received, packed, group=self.group(link), async_op=True),
                          issued=self._issued("all_to_all", link, f"{fmt} reduce_scatter"))

        def finish() -> torch.Tensor:
            pending.wait()
            keep_for_current_stream(received)  # allocated on the issuing stream; read on this one
            values = q.dequantize(received, rows.shape[1], fmt, block)
            values[own] = rows[own]
            return values.sum(dim=0)

        return finish

    def _start_quantized_all_reduce(self, tensor: torch.Tensor, link: str, fmt: str,
                                    op: dist.ReduceOp.RedOpType) -> "Pending":
        """All-reduce as a quantized reduce-scatter, then a quantized all-gather of the sums, so
        every element is quantized once per hop. The second hop is issued as soon as the first
        lands, not when the handle is waited for (:mod:`.relay`)."""
        k, flat = self.size(link), tensor.view(-1)
        padded = -(-flat.numel() // k) * k
        work = flat if padded == flat.numel() else torch.cat([flat, flat.new_zeros(padded - flat.numel())])
        exchange = self._start_quantized_exchange(work, link, fmt)

        def second_hop(group: dist.ProcessGroup) -> Pending:
            summed = exchange()
            if op == dist.ReduceOp.AVG:
                summed.div_(k)
            return self._start_quantized_all_gather(work, summed, link, fmt, group)

        landed = self._relay.submit(second_hop)

        def finish() -> None:
            landed()
            if work is not flat:
                flat.copy_(work[: flat.numel()])

        return Pending(None, finish)

    # Columns: in a buffer of n blocks in flat-rank order, viewed (g, m, S), this rank's column
    # is ``[:, local_index]``, the blocks of every group's rank with its local index. Where each
    # group's (m, S) rows are contiguous, the intra collectives run once per group block, straight
    # on the buffer; otherwise (an HO-Ring chunk: S-strided rows) blocks are permuted here.

    def start_reduce_scatter_columns(self, output: torch.Tensor, blocks: torch.Tensor) -> "Pending":
        """Intra-group reduce-scatter of ``blocks`` (g, m, S), possibly a strided view, into this
        rank's column: ``output`` (g*S) = sum over the group's ranks of ``blocks[:, local_index]``."""
        if blocks[0].is_contiguous():
            by_group = output.view(blocks.shape[0], -1)
            return _all_of([self.start_reduce_scatter(by_group[j], block.view(-1), INTRA)
                            for j, block in enumerate(blocks)])
        by_local = blocks.transpose(0, 1).contiguous()  # (m, g, S): block l goes to local rank l
        return self.start_reduce_scatter(output, by_local.view(-1), INTRA)

    def start_all_gather_columns(self, output: torch.Tensor, column: torch.Tensor) -> "Pending":
        """Intra-group all-gather of every rank's ``column`` (g*S) into ``output`` (g, m, S),
        possibly a strided view, so that ``output[:, l]`` is local rank l's column."""
        g, m, s = output.shape
        if output[0].is_contiguous():
            by_group = column.view(g, -1)
            return _all_of([self.start_all_gather(block.view(-1), by_group[j], INTRA)
                            for j, block in enumerate(output)])
        gathered = column.new_empty(m * g * s)
        pending = self.start_all_gather(gathered, column, INTRA)

        def finish() -> None:
            pending.wait()
            output.copy_(gathered.view(m, g, s).transpose(0, 1))

        return Pending(None, finish)

    def all_gather(self, output: torch.Tensor, input: torch.Tensor, link: str) -> None:
        self.start_all_gather(output, input, link).wait()

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, link: str,
                       op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> None:
        self.start_reduce_scatter(output, input, link, op).wait()

    def all_reduce(self, tensor: torch.Tensor, link: str,
                   op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> None:
        self.start_all_reduce(tensor, link, op).wait()


class Pending:
    """One in-flight collective and the host-side work that completes it (once, at ``wait``).

    The completing work runs in the issuing context, so collectives it issues count their
    bytes under the phase the collective was started in. If ``work`` fails, ``wait`` raises a
    :class:`~paro_fsdp.comm.errors.CollectiveError` naming what ``issued`` describes (the
    collective, its link and ranks, the phase it was issued in), chained from the backend's error.
    """

    __slots__ = ("_work", "_finish", "_context", "_issued")

    def __init__(self, work: dist.Work | None, finish: Callable[[], object] | None = None, *,
                 issued: Issued | None = None) -> None:
        self._work, self._finish = work, finish
        self._context = contextvars.copy_context() if finish is not None else None
        self._issued = issued

    def wait(self) -> None:
        work, finish, self._work, self._finish = self._work, self._finish, None, None
        if work is not None:
            try:
                work.wait()
            except CollectiveError:
                raise
            except Exception as error:
                if self._issued is None:
                    raise
                raise CollectiveError(self._issued, error, dist.get_rank()) from error
        if finish is not None:
            self._context.run(finish)


def _all_of(pendings: list[Pending]) -> Pending:
    """One handle that waits for ``pendings`` in order."""
    if len(pendings) == 1:
        return pendings[0]

    def finish() -> None:
        for pending in pendings:
            pending.wait()

    return Pending(None, finish)


def completed(pending: Pending, async_op: bool) -> Pending | None:
    """``pending`` for an asynchronous call; otherwise wait for it here and return nothing."""
    if async_op:
        return pending
    pending.wait()
    return None
