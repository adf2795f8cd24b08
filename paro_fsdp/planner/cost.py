"""Per-strategy cost model: memory per rank and time of one optimizer step.

Bytes and model-state memory come from ``paro_fsdp.formulas`` (PARO.md). On top of them:

- each phase costs ``intra_bytes / intra_bw + inter_bytes / inter_bw`` plus a latency per
  collective, each link's bytes at the rate of the collective kind that moves them (all-gather,
  reduce-scatter or all-reduce: ``Cluster.bandwidth``);
- with ``comm="ho_ring"`` a global collective (one that spans both links in a single call) is
  pipelined in C chunks, as ``HORingCollectives`` cuts it (``pipeline_depth``: up to its
  pipeline depth, none smaller than ``DEFAULT_MIN_CHUNK_BYTES``), and costs ``max(a, b) + min(a, b) / C`` for
  intra and inter times a and b: the sum when the collective is too small to cut, close to
  ``max`` when it is cut finely; each chunk pays the links' latencies, or, where ``paro probe``
  timed HO-Ring against the two-phase collectives (``Cluster.ho_ring_cost``), the collective
  pays them once plus the probed cost of cutting it for the phase's collective kind;
- collectives are issued per FSDP unit (each transformer block, plus the root module that
  holds embeddings and output), so the latency term grows with the number of blocks and,
  for per-micro-step phases, with the accumulation steps;
- with quantized inter-group traffic (``quant``), the inter link moves the packed bytes, and
  each rank spends ``elements / Cluster.quant_rate`` on quantizing and dequantizing, where
  ``elements`` is the collective's full size on that link (what it sends times k/(k-1));
- communication is not overlapped with compute (the estimate is an upper bound);
- transient memory: the unsharded parameters (gather dtype) and gradients (reduce dtype) of
  two FSDP units in flight, for the states that are sharded.
"""

from __future__ import annotations

from dataclasses import dataclass

from paro_fsdp.comm.ho_ring import DEFAULT_CHUNKS, pipeline_depth
from paro_fsdp.comm.quant import PARAM_PHASES, InterQuant
from paro_fsdp.comm.registry import DEFAULT, HO_RING, check_comm, check_ho_ring_chunks
from paro_fsdp.comm.stats import INTER, INTRA
from paro_fsdp.formulas import StateBytes, Topology, comm_bytes, comm_elements, memory_bytes, quantizes_sync_p
from paro_fsdp.planner.inputs import Cluster, ModelSizes, TrainingSetup
from paro_fsdp.strategy import Granularity, ParoStrategy
from paro_fsdp.transitions import PhasePlan, phase_plan

N, I, G = Granularity.N, Granularity.I, Granularity.G
UNITS_IN_FLIGHT = 2
MEMORY_KINDS = ("params", "grads", "optim", "buffers", "activations")


def _kinds(plan: PhasePlan, groups: int, group_size: int) -> dict[str, dict[str, float]]:
    """Which collective kinds move each link's bytes of a phase, as shares of those bytes."""
    sent: dict[str, dict[str, float]] = {INTRA: {}, INTER: {}}
    for step in plan.steps:
        kinds = sent[step.link]
        kinds[step.kind] = kinds.get(step.kind, 0.0) + step.share(groups, group_size)
    return {link: {k: v / total for k, v in kinds.items()} if (total := sum(kinds.values())) else {}
            for link, kinds in sent.items()}


@dataclass(frozen=True)
class StrategyEstimate:
    """Estimated memory per rank and step time of one strategy on one cluster."""

    strategy: ParoStrategy
    effective: ParoStrategy  # what it behaves as on this mesh (m = 1 or g = 1 collapse I)
    memory: dict[str, float]  # bytes per rank, keys MEMORY_KINDS
    comm_bytes: dict[str, dict[str, float]]  # {phase: {"intra", "inter"}} bytes per rank per step
    comm_seconds_by_phase: dict[str, float]
    collectives: int  # sub-collectives per rank per step
    compute_seconds: float
    fits: bool
    quant: InterQuant | None = None  # what crosses groups quantized; None: exact
    comm: str = DEFAULT  # the global collectives priced
    ho_ring_chunks: int | None = None  # with comm="ho_ring": its pipeline depth (None: its default)

    @property
    def collectives_label(self) -> str:
        """``default`` or ``ho_ring/C`` (HO-Ring at pipeline depth C)."""
        return self.comm if self.comm != HO_RING else f"{HO_RING}/{self.ho_ring_chunks or DEFAULT_CHUNKS}"

    @property
    def label(self) -> str:
        """The strategy's code, with the quantization's label where there is one (``IIG+p8g8``)."""
        return self.strategy.code if self.quant is None else f"{self.strategy.code}+{self.quant.label}"

    @property
    def total_memory(self) -> float:
        return sum(self.memory.values())

    @property
    def intra_bytes(self) -> float:
        return sum(p[INTRA] for p in self.comm_bytes.values())

    @property
    def inter_bytes(self) -> float:
        return sum(p[INTER] for p in self.comm_bytes.values())

    @property
    def comm_seconds(self) -> float:
        return sum(self.comm_seconds_by_phase.values())

    @property
    def step_seconds(self) -> float:
        return self.compute_seconds + self.comm_seconds


def _unit_collective_bytes(phase_name: str, model: ModelSizes, s: ParoStrategy, layout: StateBytes,
                           groups: int) -> float:
    """Full size of one unit's global collective in a phase (what HO-Ring chunks)."""
    unit_params = model.unit_params_for(s, groups)
    unit_trainable = unit_params * model.trainable_params / model.params
    if phase_name == "param_gather":
        return unit_params * model.wire_param_bytes
    if phase_name == "grad_reduce":
        return unit_trainable * model.wire_grad_bytes
    return unit_trainable * (layout.sync_p if phase_name == "sync_p" else model.master_bytes)


def estimate(strategy: ParoStrategy | str, model: ModelSizes, cluster: Cluster,
             setup: TrainingSetup = TrainingSetup(), comm: str = DEFAULT,
             ho_ring_chunks: int | None = None, quant: InterQuant | None = None) -> StrategyEstimate:
    """Memory per rank and step time of ``strategy`` (see the module docstring for the model).

    ``ho_ring_chunks`` is HO-Ring's pipeline depth with ``comm="ho_ring"`` (``None``: its default);
    ``quant``: what crosses groups quantized.
    """
    s = ParoStrategy.parse(strategy)
    check_comm(comm)
    if quant is not None and cluster.quant_rate is None:
        raise ValueError("pricing quantized traffic needs Cluster.quant_rate (elements per second a rank quantizes "
                         "and dequantizes): `paro probe` measures it, or give --quant-rate")
    depth = check_ho_ring_chunks(ho_ring_chunks, comm) or DEFAULT_CHUNKS
    topo = Topology(cluster.nodes, cluster.ranks_per_node)
    psi, psi_t = model.params, model.trainable_params

    layout = model.layout(s, master_apart=quantizes_sync_p(s, cluster.nodes, quant))
    states = memory_bytes(s, topo, psi, psi_t, param_bytes=layout.params,
                          grad_bytes=model.grad_bytes, optim_bytes=layout.optim, quant=quant)
    runs = s.effective_on(cluster.nodes, cluster.ranks_per_node)  # whose units paro_parallelize makes
    unit_trainable = model.unit_params_for(runs, cluster.nodes) * psi_t / psi
    buffers = UNITS_IN_FLIGHT * (
        (model.unit_params_for(runs, cluster.nodes) * model.wire_param_bytes if s.param is not N else 0.0)
        + (unit_trainable * model.wire_grad_bytes if s.grad is not N else 0.0)
    )
    memory = {**states, "buffers": buffers, "activations": float(setup.activation_bytes)}

    nbytes = comm_bytes(s, topo, psi, psi_t, accum=setup.accum, param_bytes=model.wire_param_bytes,
                        grad_bytes=model.wire_grad_bytes, master_bytes=model.master_bytes,
                        sync_p_bytes=layout.sync_p, quant=quant)
    elements = comm_elements(s, topo, psi, psi_t, accum=setup.accum)
    # Size-1 groups issue no collective (nothing to exchange).
    has_intra, has_inter = cluster.ranks_per_node > 1, cluster.nodes > 1
    seconds: dict[str, float] = {}
    collectives = 0
    for phase_name, plan in phase_plan(s).items():
        kinds = _kinds(plan, cluster.nodes, cluster.ranks_per_node)
        intra_t, inter_t = (sum(nbytes[phase_name][link] * share / cluster.bandwidth(kind, link)
                                for kind, share in kinds[link].items()) for link in (INTRA, INTER))
        intra_calls, inter_calls = (sum(st.link == link for st in plan.steps) for link in (INTRA, INTER))
        times, is_global = plan.times(setup.accum), plan.is_global
        chunks = 1
        if comm == HO_RING and is_global:
            chunks = pipeline_depth(_unit_collective_bytes(phase_name, model, runs, layout, cluster.nodes), depth)
            transfer = max(intra_t, inter_t) + min(intra_t, inter_t) / chunks
        else:
            transfer = intra_t + inter_t
        units = model.units_for(runs, cluster.nodes)
        calls_intra = intra_calls * times * units if has_intra else 0
        calls_inter = inter_calls * times * units if has_inter else 0
        collectives += (calls_intra + calls_inter) * chunks
        latency = calls_intra * cluster.intra_latency + calls_inter * cluster.inter_latency
        measured = cluster.ho_ring_cost.get(max(kinds[INTER], key=kinds[INTER].get)) if kinds[INTER] else None
        if chunks == 1 or measured is None:  # every chunk pays each link's latency
            seconds[phase_name] = transfer + latency * chunks
        else:  # the probed cost of cutting, never below the busier link's transfer
            seconds[phase_name] = max(transfer + times * units * measured.seconds(chunks), max(intra_t, inter_t)) \
                + latency
        if quant is not None and has_inter and \
                quant.format_for(phase_name, "all_gather" if phase_name in PARAM_PHASES else "reduce_scatter"):
            k = cluster.nodes
            seconds[phase_name] += elements[phase_name][INTER] * k / (k - 1) / cluster.quant_rate

    total = sum(memory.values())
    return StrategyEstimate(
        strategy=s,
        effective=s.effective_on(cluster.nodes, cluster.ranks_per_node),
        memory=memory,
        comm_bytes=nbytes,
        comm_seconds_by_phase=seconds,
        collectives=collectives,
        compute_seconds=setup.compute_seconds,
        fits=total <= cluster.device_memory,
        quant=quant,
        comm=comm,
        ho_ring_chunks=depth if comm == HO_RING else None,
    )
