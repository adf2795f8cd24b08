"""The sharding engine: each unit's gradient and parameter state, moved by the transition table.

FSDP2 owns the parameters at granularity P (``fully_shard`` over a 1-rank mesh for N, the
``dp_shard`` mesh for I, the flattened mesh for G) and gathers them every micro-step; its
gathers, reductions and gradients reach the engine through :mod:`paro_fsdp.fsdp_seam`. The
engine reduces each gradient to G every micro-step (``grad_reduce``), accumulates it there in
fp32, and after the last micro-step reduces it to the optimizer's granularity O and completes
the sum (``sync_g``). After the optimizer step, :meth:`Unit.sync_params` brings the updated O
slices back to P (``sync_p``). Which collectives each move runs is
:mod:`paro_fsdp.transitions`' table; :func:`run` executes an entry.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.distributed.fsdp import FSDPModule

from paro_fsdp import fsdp_seam
from paro_fsdp.comm.groups import MeshGroups, Pending
from paro_fsdp.comm.quant import feedback_slot
from paro_fsdp.comm.registry import Collectives
from paro_fsdp.comm.stats import INTRA, CommStats, phase
from paro_fsdp.formulas import quantizes_sync_p
from paro_fsdp.layout import ParamRegion, RowLayout
from paro_fsdp.strategy import Granularity, ParoStrategy
from paro_fsdp.transitions import ALL_GATHER, COMPLETE, REDUCE, Transition, complete, gather, reduce

N, I, G = Granularity.N, Granularity.I, Granularity.G


@dataclass
class EngineState:
    """Everything ``paro_parallelize`` attaches to the root module."""

    strategy: ParoStrategy  # what runs (degenerate meshes collapse I)
    requested: ParoStrategy  # what the user asked for
    groups: MeshGroups
    collectives: Collectives
    units: list["Unit"] = field(default_factory=list)
    last_microstep: bool = True
    optimizer: object | None = None
    divide_factor: float | None = None  # None: the mean over all n ranks
    compute_dtype: torch.dtype | None = None  # the mixed-precision policy's param_dtype
    # sync_p's in flight at once (None: all). The rest wait in the queue, in the order forward
    # reads them, and start as earlier ones are consumed: a small collective issued between the
    # step and the next forward (a loss or token-count all-reduce) then waits behind at most
    # this many units on a shared link, not behind the whole update.
    sync_p_window: int | None = 2
    sync_p_queue: deque[tuple["Unit", torch.Tensor]] = field(default_factory=deque)

    @property
    def stats(self) -> CommStats:
        return self.groups.stats

    def set_last_microstep(self, last: bool) -> None:
        """Record whether the next backward ends the accumulation window.

        FSDP2 defers its own reduction only where the strategy keeps full gradients (G=N);
        for G=I/G the per-micro-step reduction is the point of the strategy.
        """
        self.last_microstep = last
        for unit in self.units:
            fsdp_seam.set_fsdp_gradient_sync(unit.module, unit.row_due())
            if self.strategy.param is N:
                # Parameters change only at the step: a P=N unit keeps its gathered copy through
                # the accumulation window instead of copying it again at every micro-step.
                fsdp_seam.set_fsdp_reshard_after_backward(unit.module, last)

    def release_gathered_params(self) -> None:
        """Before the parameters change at a step, free what P=N units keep gathered."""
        for unit in self.units:
            unit.release_gathered()

    def grads_ready(self) -> bool:
        return all(u.summed_grad()[0] is not None for u in self.units if u.layout.regions)

    @property
    def forward_order(self) -> list["Unit"]:
        """Units in the order forward first reads them: the root (its unshard opens forward), then the blocks."""
        return self.units[-1:] + self.units[:-1]

    def wait_params(self) -> None:
        """Finish every unit's sync_p (in forward order, the same on every rank)."""
        for unit in self.forward_order:
            unit.wait_params()

    def issue_params(self, through: "Unit | None" = None) -> None:
        """Start queued sync_p's while fewer than ``sync_p_window`` are in flight, and at least
        up to ``through``. Called at the same program points on every rank, so every rank starts
        them in the same order."""
        queue = self.sync_p_queue
        needed = through is not None and any(u is through for u, _ in queue)
        while queue:
            if not needed and self.sync_p_window is not None and \
                    sum(u.params_in_flight for u in self.units) >= self.sync_p_window:
                return
            unit, compact = queue.popleft()
            unit.start_params(compact)
            needed = needed and unit is not through


def start(t: Transition, x: torch.Tensor, state: EngineState, *, columns: bool,
          out: torch.Tensor | None = None) -> tuple[torch.Tensor, Pending]:
    """Issue transition ``t`` on ``x``: the tensor that holds the result once the returned
    handle is waited for (``out`` when given; ``x`` itself for ``complete``, done in place).

    ``columns``: the N-level data is n chunks in flat-rank order (the engine's rows of P=N units,
    FSDP's buffers at P=G), so a rank's I-level share is its column of chunks ``j*m + local``;
    otherwise (FSDP's buffers at P=I) it is the rank's contiguous 1/m block. Only the
    inter-group part of a global collective is left in flight (see ``Collectives``).
    """
    groups = state.groups
    if t.direction == COMPLETE:
        if not t.steps:
            return x, _DONE
        if t.is_global:
            return x, state.collectives.all_reduce(x, async_op=True)
        (step,) = t.steps
        return x, groups.start_all_reduce(x, step.link)
    if out is None:
        if not t.steps:
            return x, _DONE
        ratio = t.src.fraction(groups.group_size, groups.world) / t.dst.fraction(groups.group_size, groups.world)
        out = x.new_empty(round(x.numel() / ratio))
    if not t.steps:
        if out.data_ptr() != x.data_ptr():
            out.copy_(x.view(out.shape))
        return out, _DONE
    if t.is_global:
        collective = state.collectives.reduce_scatter if t.direction == REDUCE else state.collectives.all_gather
        return out, collective(out, x, async_op=True)
    (step,) = t.steps
    g, m = groups.groups, groups.group_size
    if step.link == INTRA and columns:
        if step.kind == ALL_GATHER:
            return out, groups.start_all_gather_columns(out.view(g, m, -1), x.reshape(-1))
        return out, groups.start_reduce_scatter_columns(out, x.view(g, m, -1))
    if step.kind == ALL_GATHER:
        return out, groups.start_all_gather(out, x, step.link)
    return out, groups.start_reduce_scatter(out, x, step.link)


def run(t: Transition, x: torch.Tensor, state: EngineState, *, columns: bool,
        out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`start`, then wait for it."""
    out, pending = start(t, x, state, columns=columns, out=out)
    pending.wait()
    return out


_DONE = Pending(None)


class Unit:
    """One FSDP2 module's trainable parameters and their gradient / optimizer slices."""

    def __init__(self, modules: list[FSDPModule], state: EngineState, index: int) -> None:
        self.modules = modules  # sharded together (one FSDP2 state); hooks that read or write go on each
        self.module = module = modules[0]  # whose FSDP2 state the unit's seam uses
        self.state = state
        self.index = index  # position in ``state.units``: the same on every rank and in every run of the model
        params = fsdp_seam.sharded_params(module)
        regions, offset = [], 0
        for p in params or []:
            if p.param.requires_grad:
                regions.append(ParamRegion(p.param, offset, p.param._local_tensor.numel()))
                offset += p.padded_numel
        self.layout = RowLayout(regions, offset, state.strategy.param, state.groups)
        # The paper's layout where P is coarser than O: the fp32 master lives only at O, beside
        # the moments, and P holds a copy in the narrower compute dtype (the optimizer sets it up).
        # So also where sync_p crosses groups quantized: P's copy then holds dequantized values,
        # which must not become what the next step updates. Otherwise the copy at P is the master.
        s, dtype = state.strategy, state.compute_dtype
        narrower = dtype is not None and bool(regions) and dtype.itemsize < regions[0].param.dtype.itemsize
        quantized = quantizes_sync_p(s, state.groups.groups, state.groups.quant)
        self.keeps_master_apart = bool(regions) and s.param < s.optim and (narrower or quantized)
        self.grad_accum: torch.Tensor | None = None  # fp32, at G, summed over this window's micro-steps
        self._optim_grad: torch.Tensor | None = None  # fp32, at O, summed over ranks until divided
        self._grad_divisor = 1.0  # what _optim_grad is still to be divided by
        # In flight: a micro-step's reduction to G, the gradient's sync_g and the parameters'
        # sync_p, each as (the buffer it fills, its handle).
        self._grad_reduce: tuple[torch.Tensor, Pending] | None = None
        self._sync_g: tuple[torch.Tensor | None, Pending] | None = None
        self._sync_p: tuple[torch.Tensor, Pending] | None = None
        # Where G=N and the unit computes in place: the row this window's gradient accumulates
        # in, and, once the step has consumed it, the zeroed row the next window reuses.
        self._row_in_use: torch.Tensor | None = None
        self._spare_row: torch.Tensor | None = None
        if params is not None:
            fsdp_seam.attach(self)

    def _run(self, t: Transition, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``run`` on this unit's own rows (chunked n ways for P=N, so I-level shares are columns)."""
        return run(t, x, self.state, columns=True, out=out)

    # Parameter path.

    def gather_params(self, output: torch.Tensor, input: torch.Tensor) -> None:
        """FSDP2's all-gather: this rank's P shard (aliasing its slice of ``output``) to the full unit."""
        with phase("param_gather"):
            run(gather(self.state.strategy.param, N), input, self.state,
                columns=self.state.strategy.param is G, out=output)

    def gather(self, x: torch.Tensor, src: Granularity, dst: Granularity) -> torch.Tensor:
        """All-gather this unit's compact buffer at ``src`` to the coarser ``dst``."""
        return self._run(gather(src, dst), x)

    @property
    def syncs_params(self) -> bool:
        """Whether the optimizer's updates must be gathered to reach the parameters (O finer than P)."""
        return bool(gather(self.state.strategy.optim, self.state.strategy.param).steps)

    def sync_params(self, compact: torch.Tensor) -> None:
        """Bring the O-granularity parameter slices (``compact``) to every P copy (queued, see
        ``EngineState.sync_p_window``; call in forward order).

        The gather stays in flight until :meth:`wait_params`, which runs before anything reads
        the parameters again (FSDP2's next all-gather of this unit, a state dict, a load).
        """
        self.wait_params()
        self.state.sync_p_queue.append((self, compact))
        self.state.issue_params()

    def start_params(self, compact: torch.Tensor) -> None:
        s = self.state.strategy
        with phase("sync_p"):
            self._sync_p = start(gather(s.optim, s.param), compact, self.state, columns=True)

    @property
    def params_in_flight(self) -> bool:
        return self._sync_p is not None

    def wait_params(self) -> None:
        """Finish this unit's sync_p, if one is queued or in flight: its parameters are current afterwards."""
        self.state.issue_params(through=self)
        if self._sync_p is None:
            return
        (row, pending), self._sync_p = self._sync_p, None
        pending.wait()
        for region in self.layout.regions:
            region.local_flat().copy_(row[region.offset : region.offset + region.numel])
        self.state.issue_params()

    def prepare_load(self) -> None:
        """Before a load writes the parameters: land any sync_p, drop a kept gathered copy."""
        self.wait_params()
        self.release_gathered()

    def release_gathered(self) -> None:
        """Free the gathered copy a P=N unit keeps between micro-steps (after a backward that did
        not end the window), so that the next forward gathers parameters that have changed."""
        if self.state.strategy.param is N:
            fsdp_seam.reshard(self.module)

    # Gradient path: N --grad_reduce--> G (accumulated) --sync_g--> O. FSDP2 produces P; where
    # P is finer than G (G < P), the first part of sync_g runs inside FSDP2's reduce-scatter.

    def reduce_to_params(self, output: torch.Tensor, input: torch.Tensor) -> None:
        """FSDP2's reduce-scatter: ``input`` is this rank's full unit gradient, ``output`` its P row."""
        s, last = self.state.strategy, self.state.last_microstep
        columns = s.param is G
        if s.param <= s.grad:
            with self._gradient_phase("grad_reduce"):
                run(reduce(N, s.param), input, self.state, columns=columns, out=output)
            return
        # G coarser than P: with G=N FSDP2 itself accumulates and calls this once per step; with
        # G=I (GIG) the unit accumulates at G and reduces on to P after the last micro-step.
        x = input.view(-1)
        if s.grad is not N:
            with self._gradient_phase("grad_reduce"):
                self._accumulate(run(reduce(N, s.grad), x, self.state, columns=columns))
            if not last:
                output.zero_()  # ignored: the hook acts after the last micro-step only
                return
            x, self.grad_accum = self.grad_accum, None
        with self._gradient_phase("sync_g"):
            run(reduce(s.grad, s.param), x, self.state, columns=columns, out=output)

    def row_due(self) -> bool:
        """Whether the next backward's gradient row goes on to G: at every micro-step, except
        where G=N keeps accumulating it in place until the last."""
        return self.state.last_microstep or self.state.strategy.grad is not N

    def new_row(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A zeroed gradient row for a unit that computes in place: the last window's row where it
        is kept (G=N), else a new one. Reusing it spares an allocation per step (on CPU a fresh
        buffer is also faulted in page by page); the row is the gradient G=N holds through every
        window anyway, as DDP keeps its buckets."""
        spare, self._spare_row = self._spare_row, None
        if spare is not None and spare.dtype == dtype and spare.device == device:
            return spare.zero_()
        return torch.zeros(self.layout.padded_numel, dtype=dtype, device=device)

    def on_reduced(self, reduce_output: torch.Tensor) -> None:
        """FSDP2's all-reduce hook: ``reduce_output`` is this rank's P row, summed over P's ranks."""
        self.on_row(self.layout.pad(reduce_output))

    def on_row(self, row: torch.Tensor, *, own: bool = False) -> None:
        """This rank's P row of gradients, summed over P's ranks and padded to the layout's
        chunks: FSDP2's reduce output, or, for a unit that computes in place (``own``: made by
        :meth:`new_row`), the row autograd accumulated into (taken over here, as the
        accumulation at G where G=N)."""
        s, last = self.state.strategy, self.state.last_microstep
        if own and s.grad is N:
            self._row_in_use = row  # free again once zero_grad has seen this window's sync_g land
        to_optim, completion = reduce(max(s.param, s.grad), s.optim), complete(s.optim)
        if s.param <= s.grad:
            self._finish_grad_reduce()
            with self._gradient_phase("grad_reduce"):
                x, pending = start(reduce(s.param, s.grad), row, self.state, columns=True)
            if pending is _DONE:
                self._accumulate(x)
            else:  # accumulated when the next micro-step's arrives, or when the gradient is read
                self._grad_reduce = (x, pending)
            if not last:
                return
            self.wait_grads()  # an earlier synchronized backward's sync_g, if not yet consumed
            if not (to_optim.steps or completion.steps):  # this reduction was the gradient's last move
                self._sync_g = (None, Pending(None, self._finish_grad_reduce))
                return
            self._finish_grad_reduce()
            x, self.grad_accum = self.grad_accum, None
        elif not last:
            return
        else:
            self.wait_grads()
            x = row.float()
        with self._gradient_phase("sync_g"):
            if completion.steps:  # the reduction stays in the group: finish it, overlap the completion
                self._sync_g = start(completion, self._run(to_optim, x), self.state, columns=True)
            else:
                self._sync_g = start(to_optim, x, self.state, columns=True)

    @contextlib.contextmanager
    def _gradient_phase(self, name: str) -> Iterator[None]:
        """``phase(name)`` for this unit's gradient collectives, which keep their error-feedback
        residuals (``InterQuant.error_feedback``) under this unit and phase."""
        with phase(name), feedback_slot((self.index, name)):
            yield

    def _finish_grad_reduce(self) -> None:
        if self._grad_reduce is not None:
            (x, pending), self._grad_reduce = self._grad_reduce, None
            pending.wait()
            self._accumulate(x)

    def wait_grads(self) -> None:
        """Finish this unit's sync_g, if one is in flight, into the gradient at O, summed over the
        ranks: it is divided when read (:attr:`optim_grad`) or scaled (:meth:`scale_grad_`)."""
        if self._sync_g is None:
            return
        (x, pending), self._sync_g = self._sync_g, None
        pending.wait()
        if x is None:  # the sync was the last micro-step's reduction: its sum is the gradient
            x, self.grad_accum = self.grad_accum, None
        divisor = self.state.divide_factor or self.state.groups.world
        if self._optim_grad is None:
            self._optim_grad, self._grad_divisor = x, divisor
        else:  # several synchronized backwards before one step: gradients add up, as in DDP
            self._divide_grad()
            self._optim_grad += x.div_(divisor)

    def _divide_grad(self) -> None:
        if self._grad_divisor != 1.0:
            self._optim_grad.div_(self._grad_divisor)
            self._grad_divisor = 1.0

    @property
    def optim_grad(self) -> torch.Tensor | None:
        """The synchronized gradient at O (fp32, averaged), once its sync_g has completed."""
        self.wait_grads()
        if self._optim_grad is not None:
            self._divide_grad()
        return self._optim_grad

    def summed_grad(self) -> tuple[torch.Tensor | None, float]:
        """The synchronized gradient at O as it is held, and what it is still to be divided by:
        the clip takes its norm from it and scales it once, the division folded in, where
        dividing first would cost a pass over the gradient of its own."""
        self.wait_grads()
        return self._optim_grad, self._grad_divisor

    def scale_grad_(self, factor: torch.Tensor) -> None:
        """Multiply the averaged gradient at O by ``factor`` (a scalar tensor on any device)."""
        grad, divisor = self.summed_grad()
        if grad is not None:
            grad.mul_((factor.double() / divisor).to(grad))
            self._grad_divisor = 1.0

    def _accumulate(self, x: torch.Tensor) -> None:
        """Add ``x`` to the fp32 sum at G. ``x`` may be FSDP2's reduce output itself: FSDP2 only
        reads it after the hook (its sharded gradients, which are dropped), so it is taken over."""
        if self.grad_accum is not None:
            self.grad_accum += x
        else:
            self.grad_accum = x.float()

    def zero_grad(self) -> None:
        self._finish_grad_reduce()
        self.wait_grads()
        self.grad_accum = self._optim_grad = None
        self._grad_divisor = 1.0
        if self._row_in_use is not None:
            self._spare_row, self._row_in_use = self._row_in_use, None

    def grad_bytes(self) -> int:
        """Bytes of gradient state this unit keeps between micro-steps."""
        held = [t for t in (self.grad_accum, self._optim_grad, self._spare_row) if t is not None]
        held += [p[0] for p in (self._grad_reduce, self._sync_g) if p is not None and p[0] is not None]
        held += fsdp_seam.fsdp_held_gradients(self.module)
        held += [r for (slot, _), r in self.state.groups.residuals.items() if slot[0] == self.index]
        return sum(t.numel() * t.element_size() for t in held)
