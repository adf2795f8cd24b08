"""PARO.md's communication and memory costs, per rank, for one optimizer step.

Everything here is arithmetic on sizes. Bytes are summed over the transition table
(:mod:`paro_fsdp.transitions`) that the engine runs; the planner builds its time model on
them. The tests check the engine against PARO.md's formulas written out independently.
"""

from __future__ import annotations

from dataclasses import dataclass

from paro_fsdp.comm.quant import PARAM_PHASES, InterQuant
from paro_fsdp.comm.stats import INTER
from paro_fsdp.strategy import ParoStrategy
from paro_fsdp.transitions import PHASES as TRAINING_PHASES
from paro_fsdp.transitions import gather, phase_plan


@dataclass(frozen=True)
class Topology:
    """``groups`` (g) groups of ``group_size`` (m) ranks each."""

    groups: int
    group_size: int

    def __post_init__(self) -> None:
        for name in ("groups", "group_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Topology.{name} must be a positive integer, got {value!r}")

    @property
    def world(self) -> int:
        return self.groups * self.group_size


@dataclass(frozen=True)
class StateBytes:
    """Bytes per element of the model states under a strategy's precision layout."""

    params: int  # the copy at P
    optim: int  # K, per trainable element at O: the moments, plus the fp32 master where it is separate
    sync_p: int  # what sync_p moves per element


def quantizes_sync_p(strategy: ParoStrategy | str, groups: int, quant: InterQuant | None) -> bool:
    """Whether ``strategy``'s sync_p crosses groups quantized (then P holds dequantized copies)."""
    s = ParoStrategy.parse(strategy)
    return quant is not None and quant.params is not None and groups > 1 and \
        any(step.link == INTER for step in gather(s.optim, s.param).steps)


def state_bytes(strategy: ParoStrategy | str, compute_bytes: int = 4, master_bytes: int = 4,
                moment_bytes: int = 8, master_apart: bool = False) -> StateBytes:
    """The paper's mixed-precision layout for ``strategy``.

    Where P is coarser than O and the compute dtype (``compute_bytes``) is narrower than the
    master's, P holds a compute-dtype copy, which is also what sync_p moves, and the master lives
    at O beside the moments (K = moments + master). So also with ``master_apart``, where sync_p
    crosses groups quantized (:func:`quantizes_sync_p`): P's copy holds dequantized values.
    Elsewhere the copy at P is the master itself (FSDP2 casts it when gathering) and K is the
    moments alone.
    """
    s = ParoStrategy.parse(strategy)
    if (compute_bytes < master_bytes or master_apart) and s.param < s.optim:
        return StateBytes(compute_bytes, moment_bytes + master_bytes, compute_bytes)
    return StateBytes(master_bytes, moment_bytes, master_bytes)


def comm_elements(strategy: ParoStrategy | str, topo: Topology, params: float,
                  trainable: float | None = None, accum: int = 1) -> dict[str, dict[str, float]]:
    """Elements each rank sends per optimizer step, ``{phase: {"intra": x, "inter": y}}``.

    ``params`` is Psi, ``trainable`` Psi' (default Psi), ``accum`` the micro-steps A. The
    collectives are those of :func:`paro_fsdp.transitions.phase_plan`.
    """
    s = ParoStrategy.parse(strategy)
    psi_t = params if trainable is None else trainable
    if accum < 1:
        raise ValueError(f"accum must be >= 1, got {accum}")
    out = {}
    for name, plan in phase_plan(s).items():
        size = plan.times(accum) * (psi_t if plan.trainable_only else params)
        out[name] = {link: size * share for link, share in plan.sent(topo.groups, topo.group_size).items()}
    return out


def comm_bytes(strategy: ParoStrategy | str, topo: Topology, params: float, trainable: float | None = None,
               accum: int = 1, param_bytes: int = 4, grad_bytes: int = 4,
               master_bytes: int = 4, sync_p_bytes: int | None = None,
               quant: InterQuant | None = None) -> dict[str, dict[str, float]]:
    """``comm_elements`` in bytes: gathers move ``param_bytes`` (the compute dtype), gradient
    reductions ``grad_bytes`` (the reduce dtype), sync_g ``master_bytes`` (the fp32 partial sums)
    and sync_p ``sync_p_bytes`` (the copy at P: ``StateBytes.sync_p``; default ``master_bytes``).
    With ``quant``, what it quantizes crosses the inter link at its packed size per element
    (payload plus scales; the per-chunk rounding to whole blocks and 4 bytes is left out)."""
    el = comm_elements(strategy, topo, params, trainable, accum)
    size = {"param_gather": param_bytes, "grad_reduce": grad_bytes, "sync_g": master_bytes,
            "sync_p": master_bytes if sync_p_bytes is None else sync_p_bytes}
    out = {p: {l: v * size[p] for l, v in links.items()} for p, links in el.items()}
    if quant is not None:
        for p, links in el.items():
            fmt = quant.format_for(p, "all_gather" if p in PARAM_PHASES else "reduce_scatter")
            out[p]["inter"] = links["inter"] * quant.bytes_per_element(fmt, size[p])
    return out


def memory_bytes(strategy: ParoStrategy | str, topo: Topology, params: float, trainable: float | None = None,
                 param_bytes: int = 4, grad_bytes: int = 4, optim_bytes: int = 8,
                 quant: InterQuant | None = None) -> dict[str, float]:
    """Model-state bytes per rank, ``{"params", "grads", "optim"}`` (PARO.md, transient buffers excluded).

    ``optim_bytes`` is K: 8 for AdamW moments beside fp32 parameters, 12 with a separate fp32 master.
    With ``quant``'s error feedback, ``grads`` includes the fp32 residuals: one per quantized
    inter-group gradient collective, the size of its input (:func:`feedback_elements`).
    """
    s = ParoStrategy.parse(strategy)
    psi_t = params if trainable is None else trainable
    m, n = topo.group_size, topo.world
    return {
        "params": param_bytes * params * s.param.fraction(m, n),
        "grads": grad_bytes * psi_t * s.grad.fraction(m, n) + 4 * feedback_elements(s, topo, psi_t, quant),
        "optim": optim_bytes * psi_t * s.optim.fraction(m, n),
    }


def feedback_elements(strategy: ParoStrategy | str, topo: Topology, trainable: float,
                      quant: InterQuant | None) -> float:
    """Elements of error-feedback residual per rank: each gradient phase's inter-group reduce-scatters
    and all-reduces each keep one the size of their input (reused at every micro-step)."""
    if quant is None or not quant.error_feedback or topo.groups == 1:
        return 0.0
    m, n = topo.group_size, topo.world
    return sum(step.extent.fraction(m, n) * trainable
               for name, plan in phase_plan(ParoStrategy.parse(strategy)).items() if name not in PARAM_PHASES
               for step in plan.steps if step.link == INTER)
