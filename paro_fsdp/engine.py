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

from dataclasses import dataclass, field

import torch
from torch.distributed.fsdp import FSDPModule

from paro_fsdp import fsdp_seam
from paro_fsdp.comm.groups import MeshGroups
from paro_fsdp.comm.registry import Collectives
from paro_fsdp.comm.stats import INTRA, CommStats, phase
from paro_fsdp.layout import ParamRegion, RowLayout
from paro_fsdp.strategy import Granularity, ParoStrategy
from paro_fsdp.transitions import ALL_GATHER, ALL_REDUCE, COMPLETE, GATHER, REDUCE, Transition, complete, gather, reduce

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
            fsdp_seam.set_fsdp_gradient_sync(unit.module, last or self.strategy.grad is not N)

    def grads_ready(self) -> bool:
        return all(u.optim_grad is not None for u in self.units if u.layout.regions)


def run(t: Transition, x: torch.Tensor, state: EngineState, *, columns: bool,
        out: torch.Tensor | None = None) -> torch.Tensor:
    """Run transition ``t`` on ``x`` and return the result (``out`` when given; ``x`` itself for
    ``complete``, which works in place).

    ``columns``: the N-level data is n chunks in flat-rank order (the engine's rows of P=N units,
    FSDP's buffers at P=G), so a rank's I-level share is its column of chunks ``j*m + local``;
    otherwise (FSDP's buffers at P=I) it is the rank's contiguous 1/m block.
    """
    if t.direction == COMPLETE:
        if t.steps:
            if t.is_global:
                state.collectives.all_reduce(x)
            else:
                (step,) = t.steps
                state.groups.all_reduce(x, step.link)
        return x
    if out is None:
        if not t.steps:
            return x
        fraction = t.dst.fraction(state.groups.group_size, state.groups.world) / \
            t.src.fraction(state.groups.group_size, state.groups.world)
        out = x.new_empty(round(x.numel() * fraction))
    if not t.steps:
        if out.data_ptr() != x.data_ptr():
            out.copy_(x.view(out.shape))
    elif t.is_global:
        if t.direction == REDUCE:
            state.collectives.reduce_scatter(out, x)
        else:
            state.collectives.all_gather(out, x)
    else:
        (step,) = t.steps
        groups, g, m = state.groups, state.groups.groups, state.groups.group_size
        if step.link == INTRA and columns:
            if step.kind == ALL_GATHER:
                groups.start_all_gather_columns(out.view(g, m, -1), x.reshape(-1)).wait()
            else:
                groups.start_reduce_scatter_columns(out, x.view(g, m, -1)).wait()
        elif step.kind == ALL_GATHER:
            groups.all_gather(out, x, step.link)
        else:
            groups.reduce_scatter(out, x, step.link)
    return out


class Unit:
    """One FSDP2 module's trainable parameters and their gradient / optimizer slices."""

    def __init__(self, module: FSDPModule, state: EngineState) -> None:
        self.module = module
        self.state = state
        params = fsdp_seam.sharded_params(module)
        regions, offset = [], 0
        for p in params or []:
            if p.param.requires_grad:
                regions.append(ParamRegion(p.param, offset, p.param._local_tensor.numel()))
                offset += p.padded_numel
        self.layout = RowLayout(regions, offset, state.strategy.param, state.groups)
        self.grad_accum: torch.Tensor | None = None  # fp32, at G, summed over this window's micro-steps
        self.optim_grad: torch.Tensor | None = None  # fp32, averaged, at O
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

    def sync_params(self, compact: torch.Tensor) -> None:
        """Write the O-granularity parameter slices (``compact``) back to every P copy."""
        s = self.state.strategy
        with phase("sync_p"):
            row = self.gather(compact, s.optim, s.param)
        for region in self.layout.regions:
            region.local_flat().copy_(row[region.offset : region.offset + region.numel])

    # Gradient path: N --grad_reduce--> G (accumulated) --sync_g--> O. FSDP2 produces P; where
    # P is finer than G (G < P), the first part of sync_g runs inside FSDP2's reduce-scatter.

    def reduce_to_params(self, output: torch.Tensor, input: torch.Tensor) -> None:
        """FSDP2's reduce-scatter: ``input`` is this rank's full unit gradient, ``output`` its P row."""
        s, last = self.state.strategy, self.state.last_microstep
        columns = s.param is G
        if s.param <= s.grad:
            with phase("grad_reduce"):
                run(reduce(N, s.param), input, self.state, columns=columns, out=output)
            return
        # G coarser than P: with G=N FSDP2 itself accumulates and calls this once per step; with
        # G=I (GIG) the unit accumulates at G and reduces on to P after the last micro-step.
        x = input.view(-1)
        if s.grad is not N:
            with phase("grad_reduce"):
                self._accumulate(run(reduce(N, s.grad), x, self.state, columns=columns), owned=True)
            if not last:
                output.zero_()  # ignored: the hook acts after the last micro-step only
                return
            x, self.grad_accum = self.grad_accum, None
        with phase("sync_g"):
            run(reduce(s.grad, s.param), x, self.state, columns=columns, out=output)

    def on_reduced(self, reduce_output: torch.Tensor) -> None:
        """FSDP2's all-reduce hook: ``reduce_output`` is this rank's P row, summed over P's ranks."""
        s, last = self.state.strategy, self.state.last_microstep
        if s.param <= s.grad:
            row = self.layout.pad(reduce_output)
            with phase("grad_reduce"):
                x = self._run(reduce(s.param, s.grad), row)
            self._accumulate(x, owned=x is not reduce_output)
            if not last:
                return
            x, self.grad_accum = self.grad_accum, None
        elif not last:
            return
        else:
            x = self.layout.pad(reduce_output).float()
            x = x.clone() if x is reduce_output else x
        with phase("sync_g"):
            x = self._run(reduce(max(s.param, s.grad), s.optim), x)
            self._run(complete(s.optim), x)
        x.div_(self.state.divide_factor or self.state.groups.world)
        if self.optim_grad is None:
            self.optim_grad = x
        else:  # several synchronized backwards before one step: gradients add up, as in DDP
            self.optim_grad += x

    def _accumulate(self, x: torch.Tensor, *, owned: bool) -> None:
        """Add ``x`` to the fp32 sum at G (``owned``: ``x`` is a buffer of the engine's, not FSDP2's)."""
        if self.grad_accum is not None:
            self.grad_accum += x
        elif x.dtype != torch.float32:
            self.grad_accum = x.float()
        else:
            self.grad_accum = x if owned else x.clone()

    def zero_grad(self) -> None:
        self.grad_accum = self.optim_grad = None

    def grad_bytes(self) -> int:
        """Bytes of gradient state this unit keeps between micro-steps."""
        held = [t for t in (self.grad_accum, self.optim_grad) if t is not None]
        held += fsdp_seam.fsdp_held_gradients(self.module)
        return sum(t.numel() * t.element_size() for t in held)
