"""Rank every effective strategy by estimated step time, the ones that fit in memory first."""

from __future__ import annotations

from paro_fsdp.comm.quant import InterQuant
from paro_fsdp.comm.registry import DEFAULT
from paro_fsdp.planner.cost import StrategyEstimate, estimate
from paro_fsdp.planner.inputs import Cluster, ModelSizes, TrainingSetup
from paro_fsdp.planner.units import BINARY, fmt
from paro_fsdp.strategy import ParoStrategy


TIME_TOLERANCE = 1e-6  # relative: equal up to float rounding


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
    (beside its exact variant, or instead of it where ``exact`` is false).
    """
    variants = ([None] if exact or quant is None else []) + ([quant] if quant is not None else [])
    return _order([estimate(s, model, cluster, setup, comm, ho_ring_chunks, q)
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
