"""Rank every effective strategy by estimated step time, the ones that fit in memory first."""

from __future__ import annotations

from paro_fsdp.comm.ho_ring import HO_RING_DEPTHS
from paro_fsdp.comm.names import AUTO, PLANNER_COMM_NAMES
from paro_fsdp.comm.quant import InterQuant
from paro_fsdp.comm.registry import COMM_NAMES, DEFAULT, HO_RING, check_ho_ring_chunks
from paro_fsdp.planner.cost import StrategyEstimate, estimate
from paro_fsdp.planner.inputs import Cluster, ModelSizes, TrainingSetup
from paro_fsdp.planner.units import BINARY, fmt
from paro_fsdp.strategy import ParoStrategy


TIME_TOLERANCE = 1e-6  # relative: equal up to float rounding


def collectives_candidates(comm: str, ho_ring_chunks: int | None = None, field: str = "comm",
                           chunks_field: str = "ho_ring_chunks") -> list[tuple[str, int | None]]:
    """The (collectives, depth) pairs to price for ``comm`` and ``ho_ring_chunks``.

    ``comm="auto"``: the two-phase collectives and HO-Ring at each of :data:`HO_RING_DEPTHS`
    (``ho_ring_chunks`` must be unset); otherwise just the pair given. ``field`` and
    ``chunks_field``: how the caller's user spells the two.

    Raises:
        ValueError: an unknown ``comm``, a depth that is not a positive int, or a depth set with
            collectives other than HO-Ring.
    """
    if comm == AUTO:
        if ho_ring_chunks is not None:
            raise ValueError(f"{chunks_field}={ho_ring_chunks} is invalid with {field}='{AUTO}' (the planner chooses "
                             f"the depth): leave {chunks_field} unset, or set {field}='{HO_RING}' to fix it")
        return [(DEFAULT, None), *((HO_RING, d) for d in HO_RING_DEPTHS)]
    if comm not in COMM_NAMES:
        raise ValueError(f"{field}={comm!r} is invalid; valid values: {', '.join(PLANNER_COMM_NAMES)}")
    return [(comm, check_ho_ring_chunks(ho_ring_chunks, comm, field=chunks_field, comm_field=field))]


def best_collectives(strategy: ParoStrategy | str, model: ModelSizes, cluster: Cluster,
                     setup: TrainingSetup = TrainingSetup(), comm: str = AUTO, ho_ring_chunks: int | None = None,
                     quant: InterQuant | None = None) -> StrategyEstimate:
    """``strategy``'s estimate with the fastest of the collectives ``comm`` allows
    (:func:`collectives_candidates`); on a tie the first (two-phase, then shallower HO-Ring)."""
    estimates = [estimate(strategy, model, cluster, setup, c, d, quant)
                 for c, d in collectives_candidates(comm, ho_ring_chunks)]
    fastest = min(e.step_seconds for e in estimates)
    return next(e for e in estimates if e.step_seconds <= fastest * (1 + TIME_TOLERANCE))


def _order(estimates: list[StrategyEstimate]) -> list[StrategyEstimate]:
    """Fitting ones first, by step time; equal times (strategies that move the same bytes in
    the same collectives, e.g. NNI and NNN) go to the one with less memory, for headroom."""
    out: list[StrategyEstimate] = []
    for fits in (True, False):
        by_time = sorted((e for e in estimates if e.fits == fits), key=lambda e: (e.step_seconds, e.label))
        while by_time:
            limit = by_time[0].step_seconds * (1 + TIME_TOLERANCE)
            tied = [e for e in by_time if e.step_seconds <= limit]
            out += sorted(tied, key=lambda e: (e.total_memory, e.step_seconds, e.label))
            by_time = by_time[len(tied):]
    return out


def plan(model: ModelSizes, cluster: Cluster, setup: TrainingSetup = TrainingSetup(),
         comm: str = DEFAULT, ho_ring_chunks: int | None = None, quant: InterQuant | None = None,
         exact: bool = True) -> list[StrategyEstimate]:
    """Estimates for all 14 strategies: those that fit by step time, then those that do not.

    With ``quant``, each strategy is also estimated with that quantized inter-group traffic
    (beside its exact variant, or instead of it where ``exact`` is false). With ``comm="auto"``
    each row is priced with its fastest collectives
    (:func:`best_collectives`; ``StrategyEstimate.comm`` / ``.ho_ring_chunks`` say which).
    """
    variants = ([None] if exact or quant is None else []) + ([quant] if quant is not None else [])
    return _order([best_collectives(s, model, cluster, setup, comm, ho_ring_chunks, q)
                   for s in ParoStrategy.all_valid() for q in variants])


def choose_strategy(model: ModelSizes, cluster: Cluster, setup: TrainingSetup = TrainingSetup(),
                    comm: str = DEFAULT, ho_ring_chunks: int | None = None, quant: InterQuant | None = None,
                    exact: bool | None = None) -> tuple[ParoStrategy, list[StrategyEstimate]]:
    """The fastest strategy that fits in device memory, and the full ranking (``plan``'s order).

    ``quant``: the quantized inter-group traffic the job runs with (every strategy is priced
    with it); ``exact``: rank the exact variants too (default: only without ``quant``), so that
    the first of the ranking says whether quantizing pays.

    Raises ``ValueError`` naming the least memory any strategy needs when none fits.
    """
    ranking = plan(model, cluster, setup, comm, ho_ring_chunks, quant, exact=quant is None if exact is None else exact)
    if not ranking[0].fits:
        smallest = min(ranking, key=lambda e: e.total_memory)
        parts = ", ".join(f"{k} {fmt(v, BINARY)}" for k, v in smallest.memory.items())
        raise ValueError(
            f"no PaRO strategy fits in {fmt(cluster.device_memory, BINARY)} of device memory per rank: "
            f"the smallest, {smallest.strategy.code}, needs {fmt(smallest.total_memory, BINARY)} ({parts}). "
            f"Use more ranks, a smaller micro-batch (activations), or more device memory."
        )
    return ranking[0].strategy, ranking


def pareto_front(estimates: list[StrategyEstimate]) -> list[StrategyEstimate]:
    """Estimates no other one beats on both memory per rank and step time, by memory."""
    front = []
    for e in sorted(estimates, key=lambda e: (e.total_memory, e.step_seconds, e.label)):
        if not front or e.step_seconds < front[-1].step_seconds:
            front.append(e)
    return front
