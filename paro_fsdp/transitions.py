"""How a model state moves between granularities: the one table of PaRO's data movement.

A *transition* takes a state from one granularity to another in one of three directions:

- ``reduce``: sum over all ranks and scatter to a finer granularity (N->I, N->G, I->G);
- ``complete``: sum over the ranks that hold copies of the same slice at a granularity
  (N: all n ranks, I: the g groups, G: nobody);
- ``gather``: all-gather to a coarser granularity (I->N, G->N, G->I).

Each is an ordered list of link steps (a collective kind on the intra- or inter-group link, over
data of a known size). The engine runs these steps, ``paro_fsdp.formulas`` sums their bytes and
the planner times them; a new or changed transition is written here only.

A strategy PGO uses them per optimizer step of A micro-steps (PARO.md's procedure):
``param_gather`` = gather(P->N), twice per micro-step; ``grad_reduce`` = reduce(N->G) per
micro-step; ``sync_g`` = reduce(G->O) then complete(O); ``sync_p`` = gather(O->P).
"""

from __future__ import annotations

from dataclasses import dataclass

from paro_fsdp.comm.stats import INTER, INTRA
from paro_fsdp.strategy import Granularity, ParoStrategy

N, I, G = Granularity.N, Granularity.I, Granularity.G

ALL_GATHER, REDUCE_SCATTER, ALL_REDUCE = "all_gather", "reduce_scatter", "all_reduce"
REDUCE, COMPLETE, GATHER = "reduce", "complete", "gather"
PHASES = ("param_gather", "grad_reduce", "sync_g", "sync_p")


@dataclass(frozen=True)
class LinkStep:
    """One collective on one link.

    ``extent`` is the granularity whose per-rank share is the collective's full size: a ring
    reduce-scatter or all-gather of S over k ranks sends (k-1)/k*S per rank, an all-reduce
    twice that.
    """

    kind: str
    link: str
    extent: Granularity

    def share(self, groups: int, group_size: int) -> float:
        """Fraction of the whole state this rank sends in this step."""
        k = group_size if self.link == INTRA else groups
        factor = 2.0 if self.kind == ALL_REDUCE else 1.0
        return factor * (k - 1) / k * self.extent.fraction(group_size, groups * group_size)


@dataclass(frozen=True)
class Transition:
    """A state's move from ``src`` to ``dst`` granularity (equal for ``complete``)."""

    direction: str
    src: Granularity
    dst: Granularity
    steps: tuple[LinkStep, ...]

    @property
    def is_global(self) -> bool:
        """Whether it is one collective over all n ranks (what HO-Ring pipelines), not one link's."""
        return {s.link for s in self.steps} == {INTRA, INTER}

    def sent(self, groups: int, group_size: int) -> dict[str, float]:
        """Fraction of the whole state this rank sends, per link."""
        out = {INTRA: 0.0, INTER: 0.0}
        for step in self.steps:
            out[step.link] += step.share(groups, group_size)
        return out


def _t(direction: str, src: Granularity, dst: Granularity, *steps: LinkStep) -> Transition:
    return Transition(direction, src, dst, tuple(steps))


# Global collectives are hierarchical: a reduce-scatter runs intra first (over the full data),
# then inter (over this rank's 1/m); an all-gather the reverse; an all-reduce is an intra
# reduce-scatter, an inter all-reduce of the 1/m piece and an intra all-gather.
_TABLE: dict[tuple[str, Granularity, Granularity], Transition] = {
    t[:3]: _t(*t) for t in [
        (REDUCE, N, I, LinkStep(REDUCE_SCATTER, INTRA, N)),
        (REDUCE, N, G, LinkStep(REDUCE_SCATTER, INTRA, N), LinkStep(REDUCE_SCATTER, INTER, I)),
        (REDUCE, I, G, LinkStep(REDUCE_SCATTER, INTER, I)),
        (COMPLETE, N, N, LinkStep(REDUCE_SCATTER, INTRA, N), LinkStep(ALL_REDUCE, INTER, I),
         LinkStep(ALL_GATHER, INTRA, N)),
        (COMPLETE, I, I, LinkStep(ALL_REDUCE, INTER, I)),
        (COMPLETE, G, G),
        (GATHER, I, N, LinkStep(ALL_GATHER, INTRA, N)),
        (GATHER, G, N, LinkStep(ALL_GATHER, INTER, I), LinkStep(ALL_GATHER, INTRA, N)),
        (GATHER, G, I, LinkStep(ALL_GATHER, INTER, I)),
    ]
}


def reduce(src: Granularity, dst: Granularity) -> Transition:
    """Sum over all ranks and scatter from ``src`` to the finer (or equal) ``dst``."""
    if dst < src:
        raise ValueError(f"reduce goes to a finer granularity, not {src.name}->{dst.name}")
    return _TABLE.get((REDUCE, src, dst), _t(REDUCE, src, dst))


def complete(level: Granularity) -> Transition:
    """Sum over the ranks holding copies of the same slice at ``level``."""
    return _TABLE[(COMPLETE, level, level)]


def gather(src: Granularity, dst: Granularity) -> Transition:
    """All-gather from ``src`` to the coarser (or equal) ``dst``."""
    if dst > src:
        raise ValueError(f"gather goes to a coarser granularity, not {src.name}->{dst.name}")
    return _TABLE.get((GATHER, src, dst), _t(GATHER, src, dst))


@dataclass(frozen=True)
class PhasePlan:
    """What one phase of an optimizer step runs: its transitions, in order, and how often."""

    transitions: tuple[Transition, ...]
    times_per_microstep: int  # 0: once per optimizer step
    trainable_only: bool  # False: frozen parameters move too (parameter gathers)

    def times(self, accum: int) -> int:
        return self.times_per_microstep * accum if self.times_per_microstep else 1

    @property
    def is_global(self) -> bool:
        """Whether the phase is a single global collective (one that HO-Ring pipelines)."""
        moving = [t for t in self.transitions if t.steps]
        return len(moving) == 1 and moving[0].is_global

    def sent(self, groups: int, group_size: int) -> dict[str, float]:
        out = {INTRA: 0.0, INTER: 0.0}
        for t in self.transitions:
            for link, share in t.sent(groups, group_size).items():
                out[link] += share
        return out

    @property
    def steps(self) -> tuple[LinkStep, ...]:
        return tuple(s for t in self.transitions for s in t.steps)


def _reductions(src: Granularity, dst: Granularity, param: Granularity) -> tuple[Transition, ...]:
    """``reduce(src, dst)`` as the engine runs it. With P=I, FSDP2 reduce-scatters a unit's
    gradient over the group (its mesh) before the engine sees it, so an N->G reduction is an
    intra N->I one followed by an inter I->G one: two single-link collectives, not a global one."""
    if param is I and src is N and dst is G:
        return reduce(N, I), reduce(I, G)
    return (reduce(src, dst),)


def phase_plan(strategy: ParoStrategy) -> dict[str, PhasePlan]:
    """The transitions of each phase of one optimizer step of ``strategy`` (PARO.md's procedure,
    split where the engine splits it)."""
    s = strategy
    return {
        # Forward, and backward after resharding.
        "param_gather": PhasePlan((gather(s.param, N),), 2, trainable_only=False),
        "grad_reduce": PhasePlan(_reductions(N, s.grad, s.param), 1, trainable_only=True),
        "sync_g": PhasePlan((*_reductions(s.grad, s.optim, s.param), complete(s.optim)), 0, trainable_only=True),
        "sync_p": PhasePlan((gather(s.optim, s.param),), 0, trainable_only=True),
    }
