"""Human-readable output of a plan: the assumptions, the ranking table and the Pareto plot."""

from __future__ import annotations

from paro_fsdp.comm.ho_ring import DEFAULT_CHUNKS, DEFAULT_MIN_CHUNK_BYTES
from paro_fsdp.comm.quant import InterQuant
from paro_fsdp.comm.names import AUTO
from paro_fsdp.comm.registry import DEFAULT, HO_RING
from paro_fsdp.planner.cost import MEMORY_KINDS, UNITS_IN_FLIGHT, StrategyEstimate
from paro_fsdp.planner.inputs import Cluster, HORingCost, ModelSizes, TrainingSetup
from paro_fsdp.planner.rank import collectives_candidates, pareto_front
from paro_fsdp.planner.units import BINARY, DECIMAL, SECONDS, fmt, unit
from paro_fsdp.strategy import ParoStrategy

def _dtypes(model: ModelSizes) -> str:
    """The dtypes line; where the compute dtype is narrower, the paper's layout for P coarser than O."""
    compute, master = model.wire_param_bytes, model.param_bytes
    line = (f"dtypes (bytes/element): params {master}, grads {model.grad_bytes}, optimizer K = {model.optim_bytes}; "
            f"all-gathers {compute}, gradient reductions {model.wire_grad_bytes}, sync_g {model.master_bytes}, "
            "sync_p the dtype of the copy at P")
    if compute < master:
        line += (f"; where P is coarser than O the copy at P is {compute}-byte and the {master}-byte master "
                 f"lives at O with the moments (K = {model.optim_bytes + master})")
    return line


def _comm_line(comm: str, ho_ring_chunks: int | None, measured: dict[str, HORingCost]) -> str:
    candidates = collectives_candidates(comm, ho_ring_chunks)
    depths = [d for c, d in candidates if c == HO_RING]
    line = f"comm = {comm}"
    if comm == AUTO:
        line += (f": each strategy priced with the two-phase collectives ({DEFAULT}) and HO-Ring at depth C in "
                 f"{{{', '.join(map(str, depths))}}}, its row with the fastest (the 'global collectives' column)")
    line += ": a phase costs intra_bytes/intra_bw + inter_bytes/inter_bw"
    if depths:
        bound = str(depths[0] or DEFAULT_CHUNKS) if len(depths) == 1 else "the depth"
        line += (", except, with HO-Ring, one global collective (P=G gathers; with P=N or G, G=G reductions and "
                 "N->G gradient syncs; N->N gradient syncs; G->N parameter syncs), pipelined in C chunks of >= "
                 f"{DEFAULT_MIN_CHUNK_BYTES / 2**20:g} MiB (C <= {bound}), "
                 "costs max(intra, inter) + min(intra, inter) / C (HO-Ring overlap), "
                 + ("each link's latency once, and the probed cost of cutting it, fixed + (C - 1) x per chunk ("
                    + ", ".join(f"{kind} {fmt(c.fixed, SECONDS)} + {fmt(c.per_chunk, SECONDS)}"
                                for kind, c in measured.items())
                    + "; other kinds: each link's latency per chunk)" if measured
                    else "every chunk paying each link's latency"))
    return line


def describe_assumptions(model: ModelSizes, cluster: Cluster, setup: TrainingSetup, comm: str,
                         ho_ring_chunks: int | None = None, quant: InterQuant | None = None) -> list[str]:
    """Every input and modelling assumption behind the numbers, one line each."""
    psi, psi_t = model.params, model.trainable_params
    lines = [
        f"model: Psi = {psi:,} parameters, Psi' = {psi_t:,} trainable ({psi_t / psi:.4g} of Psi), "
        f"{model.blocks} blocks of up to {model.unit_params:,.0f} parameters",
        _dtypes(model),
        f"cluster: {cluster.nodes} nodes x {cluster.ranks_per_node} ranks = {cluster.world} ranks; per rank: intra "
        f"{fmt(cluster.intra_bw, DECIMAL)}/s + {fmt(cluster.intra_latency, SECONDS)} per collective, inter "
        f"{fmt(cluster.inter_bw, DECIMAL)}/s + {fmt(cluster.inter_latency, SECONDS)} per collective; "
        f"device memory {fmt(cluster.device_memory, BINARY)}"
        + "".join(f"; {kind} {link} {fmt(bw, DECIMAL)}/s" for kind, links in cluster.op_bw.items()
                  for link, bw in links.items()),
        f"training: A = {setup.accum} micro-steps per optimizer step; activations "
        f"{fmt(setup.activation_bytes, BINARY)} per rank; compute {fmt(setup.compute_seconds, SECONDS)} per step"
        + (" (not modelled: ranking by communication alone)" if setup.compute_seconds == 0 else ""),
        _comm_line(comm, ho_ring_chunks, cluster.ho_ring_cost)
        + f"; plus latency per sub-collective, issued per FSDP unit ({model.units} = blocks + root"
        + (f"; NNN's blocks share units as DDP's buckets: {nnn_units})"
           if (nnn_units := model.units_for(ParoStrategy.parse("NNN"), cluster.nodes)) != model.units else ")"),
        "communication is not overlapped with compute (step time is an upper bound); equal step times "
        "rank by memory, less first",
        f"memory = params + grads + optimizer (PARO.md) + buffers (unsharded params and grads of "
        f"{UNITS_IN_FLIGHT} blocks in flight) + activations; fits iff <= device memory",
    ]
    if quant is not None:
        lines.append(
            f"quantized inter-group traffic ({quant.label}, the '+{quant.label}' rows): "
            + ", ".join(f"{what} {fmt} at {quant.bytes_per_element(fmt, 4):.3g} bytes/element"
                        for what, fmt in (("parameters", quant.params), ("gradients", quant.grads)) if fmt)
            + f" (blocks of {quant.block_size}, fp32 scales) on the inter link only; quantize + dequantize "
            f"at {cluster.quant_rate / 1e6:.4g} M elements/s per rank, over each collective's full size")
    if cluster.nodes == 1 or cluster.ranks_per_node == 1:
        lines.append("degenerate mesh: I partitions "
                     + ("over all ranks (same as G)" if cluster.nodes == 1 else "over one rank (same as N)")
                     + "; the 'same as' column names the equivalent strategy")
    return lines


def format_table(ranking: list[StrategyEstimate]) -> str:
    """The ranking as a fixed-width table (rank '-' and fits 'no' for those that do not fit)."""
    mem_scale, mem_unit = unit(max(e.total_memory for e in ranking), BINARY)
    byte_scale, byte_unit = unit(max(max(e.intra_bytes, e.inter_bytes) for e in ranking), DECIMAL)
    sec_scale, sec_unit = unit(max(e.step_seconds for e in ranking), SECONDS)
    front = {e.label for e in pareto_front(ranking)}
    header = (["rank", "strategy", "aliases", "same as"] + [f"{k} {mem_unit}" for k in MEMORY_KINDS]
              + [f"total {mem_unit}", f"intra {byte_unit}", f"inter {byte_unit}", "global collectives", "collectives",
                 f"comm {sec_unit}", f"step {sec_unit}", "fits", "pareto"])
    rows = []
    fitting = 0
    for e in ranking:
        fitting += e.fits
        rows.append(
            [str(fitting) if e.fits else "-", e.label, ",".join(e.strategy.aliases) or "-",
             e.effective.code if e.effective != e.strategy else "-"]
            + [f"{e.memory[k] / mem_scale:.3f}" for k in MEMORY_KINDS]
            + [f"{e.total_memory / mem_scale:.3f}", f"{e.intra_bytes / byte_scale:.3f}",
               f"{e.inter_bytes / byte_scale:.3f}", e.collectives_label, str(e.collectives),
               f"{e.comm_seconds / sec_scale:.4g}", f"{e.step_seconds / sec_scale:.4g}",
               "yes" if e.fits else "no", "*" if e.label in front else ""]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    left = {1, 2, 3}
    lines = ["  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    return "\n".join(lines)


def plot_pareto(ranking: list[StrategyEstimate], path: str, device_memory: float | None = None,
                title: str = "PaRO strategies") -> None:
    """Memory per rank against estimated step time, every strategy labelled, Pareto front joined."""
    try:
        import matplotlib  # noqa: PLC0415 (optional dependency)
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'paro-fsdp[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    mem_scale, mem_unit = unit(max(e.total_memory for e in ranking), BINARY)
    sec_scale, sec_unit = unit(max(e.step_seconds for e in ranking), SECONDS)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for fits, marker, label in ((True, "o", "fits"), (False, "x", "does not fit")):
        pts = [e for e in ranking if e.fits == fits]
        if pts:
            ax.scatter([e.step_seconds / sec_scale for e in pts], [e.total_memory / mem_scale for e in pts],
                       marker=marker, label=label, color="tab:blue" if fits else "tab:gray")
    for e in ranking:
        ax.annotate(e.label, (e.step_seconds / sec_scale, e.total_memory / mem_scale),
                    textcoords="offset points", xytext=(4, 3), fontsize=8)
    front = pareto_front(ranking)
    ax.plot([e.step_seconds / sec_scale for e in front], [e.total_memory / mem_scale for e in front],
            color="tab:red", linestyle="--", marker="s", fillstyle="none", label="Pareto front")
    if device_memory is not None:
        ax.axhline(device_memory / mem_scale, color="tab:orange", linestyle=":", label="device memory")
    ax.set_xlabel(f"estimated step time ({sec_unit})")
    ax.set_ylabel(f"memory per rank ({mem_unit})")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
