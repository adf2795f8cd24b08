"""PARO.md's communication formulas, written out by hand as the tests' oracle.

The library derives its byte counts from its transition table (``paro_fsdp.transitions``);
these are the published formulas, typed in independently, so that a wrong table entry shows
up as a mismatch against the measured bytes instead of agreeing with itself.
"""

from __future__ import annotations

from paro_fsdp.comm.stats import INTER, INTRA, LINKS
from paro_fsdp.formulas import Topology
from paro_fsdp.strategy import Granularity, ParoStrategy

N, I, G = Granularity.N, Granularity.I, Granularity.G
TRAINING_PHASES = ("param_gather", "grad_reduce", "sync_g", "sync_p")


def _link(intra: float = 0.0, inter: float = 0.0) -> dict[str, float]:
    return {INTRA: intra, INTER: inter}


def _gather(level: Granularity, topo: Topology) -> dict[str, float]:
    """Per-rank share sent by an all-gather (or reduce-scatter) over ``level``'s ranks."""
    g, m, n = topo.groups, topo.group_size, topo.world
    if level is N:
        return _link()
    if level is I:
        return _link(intra=(m - 1) / m)
    return _link(intra=(m - 1) / m, inter=(g - 1) / n)


def _sync_g(src: Granularity, dst: Granularity, topo: Topology) -> dict[str, float]:
    g, m, n = topo.groups, topo.group_size, topo.world
    table = {
        (N, N): _link(2 * (m - 1) / m, 2 * (g - 1) / n),
        (N, I): _link((m - 1) / m, 2 * (g - 1) / n),
        (N, G): _link((m - 1) / m, (g - 1) / n),
        (I, I): _link(0.0, 2 * (g - 1) / n),
        (I, G): _link(0.0, (g - 1) / n),
        (G, G): _link(),
    }
    return table[(src, dst)]


def _sync_p(src: Granularity, dst: Granularity, topo: Topology) -> dict[str, float]:
    g, m, n = topo.groups, topo.group_size, topo.world
    table = {
        (I, N): _link((m - 1) / m, 0.0),
        (G, N): _link((m - 1) / m, (g - 1) / n),
        (G, I): _link(0.0, (g - 1) / n),
    }
    return table.get((src, dst), _link())


def comm_elements(strategy: ParoStrategy | str, topo: Topology, params: float,
                  trainable: float | None = None, accum: int = 1) -> dict[str, dict[str, float]]:
    """Elements each rank sends per optimizer step, ``{phase: {"intra": x, "inter": y}}``.

    ``params`` is Psi, ``trainable`` Psi' (default Psi), ``accum`` the micro-steps A.
    Parameters are gathered twice per micro-step (forward, and backward after resharding).
    """
    s = ParoStrategy.parse(strategy)
    psi_t = params if trainable is None else trainable
    if accum < 1:
        raise ValueError(f"accum must be >= 1, got {accum}")
    gather, reduce_ = _gather(s.param, topo), _gather(s.grad, topo)
    sync_g, sync_p = _sync_g(s.grad, s.optim, topo), _sync_p(s.optim, s.param, topo)
    return {
        "param_gather": {l: 2 * accum * params * gather[l] for l in LINKS},
        "grad_reduce": {l: accum * psi_t * reduce_[l] for l in LINKS},
        "sync_g": {l: psi_t * sync_g[l] for l in LINKS},
        "sync_p": {l: psi_t * sync_p[l] for l in LINKS},
    }


def comm_bytes(strategy: ParoStrategy | str, topo: Topology, params: float, trainable: float | None = None,
               accum: int = 1, param_bytes: int = 4, grad_bytes: int = 4,
               master_bytes: int = 4, sync_p_bytes: int | None = None) -> dict[str, dict[str, float]]:
    """``comm_elements`` in bytes: gathers move ``param_bytes`` (the compute dtype), gradient
    reductions ``grad_bytes`` (the reduce dtype), sync_g ``master_bytes`` (fp32 partial sums) and
    sync_p ``sync_p_bytes`` (the dtype of the copy at P; default ``master_bytes``)."""
    el = comm_elements(strategy, topo, params, trainable, accum)
    size = {"param_gather": param_bytes, "grad_reduce": grad_bytes, "sync_g": master_bytes,
            "sync_p": master_bytes if sync_p_bytes is None else sync_p_bytes}
    return {p: {l: v * size[p] for l, v in links.items()} for p, links in el.items()}
