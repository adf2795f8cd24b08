"""The strategy planner: hand-computed estimates, feasibility, the paper's rankings, CLI and probe."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import pytest
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh

from conftest import needs_torchtitan
from dist_utils import run_distributed
from paro_fsdp.__main__ import main
from paro_fsdp.comm.ho_ring import DEFAULT_CHUNKS, pipeline_depth
from paro_fsdp.planner import (
    Calibration,
    Cluster,
    HORingCost,
    LinkFit,
    ModelSizes,
    TrainingSetup,
    best_collectives,
    choose_strategy,
    collectives_candidates,
    cluster_from_calibration,
    describe_assumptions,
    compute_seconds_from_flops,
    estimate,
    fit_ho_ring_cost,
    fit_link,
    format_table,
    pareto_front,
    plan,
    read_calibration,
    read_torchtitan_job,
    sizes_from_model,
    write_calibration,
)
from paro_fsdp.comm.quant import InterQuant
from paro_fsdp.formulas import Topology, comm_bytes, comm_elements
from paro_fsdp.strategy import ParoStrategy

GIB = 2**30

# A small case worked out by hand: Psi = Psi' = 1000, 2 blocks (3 FSDP units with the root),
# 2 groups x 2 ranks, A = 2, 4-byte params and grads, K = 8, intra 100 B/s + 0.5 s per
# collective, inter 10 B/s + 1 s per collective.
SMALL_MODEL = ModelSizes(params=1000, blocks=2)
SMALL_CLUSTER = Cluster(nodes=2, ranks_per_node=2, intra_bw=100.0, inter_bw=10.0, device_memory=1e9,
                        intra_latency=0.5, inter_latency=1.0)
SMALL_SETUP = TrainingSetup(accum=2)


def test_iig_by_hand() -> None:
    e = estimate("IIG", SMALL_MODEL, SMALL_CLUSTER, SMALL_SETUP)
    # Gathers: 2A * Psi * (m-1)/m * 4 B = 8000 B intra -> 80 s; 1 intra call x 2A x 3 units x 0.5 s = 6 s.
    # Reduce: A * Psi' * 1/2 * 4 B = 4000 B intra -> 40 s; 6 calls -> 3 s.
    # sync_g I->G and sync_p G->I: Psi' * (g-1)/n * 4 B = 1000 B inter -> 100 s each; 3 calls -> 3 s each.
    assert e.comm_seconds_by_phase == pytest.approx(
        {"param_gather": 86.0, "grad_reduce": 43.0, "sync_g": 103.0, "sync_p": 103.0})
    assert e.intra_bytes == pytest.approx(12000) and e.inter_bytes == pytest.approx(2000)
    assert e.collectives == 12 + 6 + 3 + 3
    # params 4*1000/2, grads 4*1000/2, optimizer 8*1000/4; buffers: 2 units of 500 params + 500 grads at 4 B.
    assert e.memory == pytest.approx({"params": 2000, "grads": 2000, "optim": 2000, "buffers": 8000,
                                      "activations": 0})
    assert e.step_seconds == pytest.approx(335.0)


def test_ho_ring_pipelines_only_global_collectives() -> None:
    # Units of 2**23 fp32 parameters = 32 MiB: HO-Ring cuts their global collectives into
    # DEFAULT_CHUNKS chunks (at most one per MiB).
    chunks = min(DEFAULT_CHUNKS, 32)
    big = ModelSizes(params=2**24, blocks=2)
    setup = TrainingSetup(accum=1)
    default, ho = (estimate("GGG", big, SMALL_CLUSTER, setup, comm=c) for c in ("default", "ho_ring"))
    # Gathers: intra 2 * Psi * 1/2 * 4 B = 2**26 B at 100 B/s, inter 2 * Psi * 1/4 * 4 B = 2**25 B at 10 B/s.
    intra, inter = 2**26 / 100.0, 2**25 / 10.0
    # Latency: 2 calls (forward, backward) x 3 units per link, each chunk paying it under HO-Ring.
    assert default.comm_seconds_by_phase["param_gather"] == pytest.approx(intra + inter + 6 * 0.5 + 6 * 1.0)
    assert ho.comm_seconds_by_phase["param_gather"] == pytest.approx(
        inter + intra / chunks + chunks * (6 * 0.5 + 6 * 1.0))
    assert ho.comm_bytes == default.comm_bytes and ho.collectives == chunks * default.collectives
    # A shallower pipeline (ho_ring_chunks) overlaps less and pays fewer latencies.
    shallow = estimate("GGG", big, SMALL_CLUSTER, setup, comm="ho_ring", ho_ring_chunks=4)
    assert shallow.comm_seconds_by_phase["param_gather"] == pytest.approx(inter + intra / 4 + 4 * (6 * 0.5 + 6 * 1.0))
    assert shallow.collectives == 4 * default.collectives
    with pytest.raises(ValueError, match=r"ho_ring_chunks=4 is HO-Ring's pipeline depth, valid only with "
                                         r"comm='ho_ring', but comm='default'"):
        estimate("GGG", big, SMALL_CLUSTER, setup, ho_ring_chunks=4)
    # N->I gradient sync is two dependent collectives: no overlap; N->G is one global reduce-scatter.
    ni_default, ni_ho = (estimate("NNI", big, SMALL_CLUSTER, setup, comm=c) for c in ("default", "ho_ring"))
    assert ni_ho.comm_seconds_by_phase["sync_g"] == pytest.approx(ni_default.comm_seconds_by_phase["sync_g"])
    ng_default, ng_ho = (estimate("NNG", big, SMALL_CLUSTER, setup, comm=c) for c in ("default", "ho_ring"))
    assert ng_ho.comm_seconds_by_phase["sync_g"] < ng_default.comm_seconds_by_phase["sync_g"]
    # Units of 2 KB are not cut: HO-Ring costs what the two phases in sequence cost.
    assert estimate("GGG", SMALL_MODEL, SMALL_CLUSTER, SMALL_SETUP, comm="ho_ring").comm_seconds_by_phase == \
        pytest.approx(estimate("GGG", SMALL_MODEL, SMALL_CLUSTER, SMALL_SETUP).comm_seconds_by_phase)
    assert [pipeline_depth(b) for b in (1000, 2**20, 3 * 2**20, 2**30)] == [1, 1, 3, DEFAULT_CHUNKS]


def test_per_kind_rates() -> None:
    # Reduce-scatters at half the rate: only reduce-scatter bytes slow down.
    slow_rs = dataclasses.replace(SMALL_CLUSTER, op_bw={"reduce_scatter": {"intra": 50.0, "inter": 5.0}})
    for code, phase_name, extra in (("IIG", "grad_reduce", 40.0),  # 4000 intra bytes: 40 s more
                                    ("IIG", "sync_g", 100.0),  # I->G inter reduce-scatter of 1000 B: 100 s more
                                    ("III", "sync_g", 0.0),  # I->I is an inter all-reduce
                                    ("IIG", "sync_p", 0.0)):  # all-gather
        base = estimate(code, SMALL_MODEL, SMALL_CLUSTER, SMALL_SETUP).comm_seconds_by_phase[phase_name]
        slow = estimate(code, SMALL_MODEL, slow_rs, SMALL_SETUP).comm_seconds_by_phase[phase_name]
        assert slow - base == pytest.approx(extra)
    # N->N's intra part is half reduce-scatter, half all-gather: 2(m-1)/m*1000*4 = 4000 B, 2000 B of it slower.
    nnn = [estimate("NNN", SMALL_MODEL, c, SMALL_SETUP).comm_seconds_by_phase["sync_g"] for c in (SMALL_CLUSTER, slow_rs)]
    assert nnn[1] - nnn[0] == pytest.approx(2000 / 50 - 2000 / 100)
    with pytest.raises(ValueError, match=r"Cluster.op_bw must map a collective kind"):
        Cluster(nodes=2, ranks_per_node=2, intra_bw=1.0, inter_bw=1.0, device_memory=1.0, op_bw={"scatter": {}})


def test_wire_dtypes_and_compute() -> None:
    mixed = ModelSizes(params=1000, blocks=2, gather_bytes=2, reduce_bytes=2)
    full, half = (estimate("GGG", m, SMALL_CLUSTER, SMALL_SETUP) for m in (SMALL_MODEL, mixed))
    assert half.comm_bytes["param_gather"]["inter"] == pytest.approx(full.comm_bytes["param_gather"]["inter"] / 2)
    assert half.comm_bytes["grad_reduce"]["intra"] == pytest.approx(full.comm_bytes["grad_reduce"]["intra"] / 2)
    assert half.memory["buffers"] == pytest.approx(full.memory["buffers"] / 2)
    assert half.memory["params"] == full.memory["params"]  # storage dtype unchanged
    setup = TrainingSetup(accum=2, compute_seconds=7.0)
    assert estimate("GGG", SMALL_MODEL, SMALL_CLUSTER, setup).step_seconds == pytest.approx(full.step_seconds + 7)
    # 6 FLOPs per parameter per token, 100 tokens x 2 micro-steps at 1.2 MFLOP/s = 1 s.
    assert compute_seconds_from_flops(SMALL_MODEL, 100, 2, 1.2e6) == pytest.approx(1.0)


def test_frozen_parameters_do_not_move_under_p_n() -> None:
    peft = ModelSizes(params=1000, trainable=10, blocks=2)
    nnn = estimate("NNN", peft, SMALL_CLUSTER, SMALL_SETUP)
    # Only the 10 trainable gradients are all-reduced: 2(m-1)/m*10*4 intra, 2(g-1)/n*10*4 inter.
    assert (nnn.intra_bytes, nnn.inter_bytes) == pytest.approx((40, 20))
    assert nnn.memory["grads"] == 40 and nnn.memory["optim"] == 80 and nnn.memory["buffers"] == 0
    # P=I gathers frozen parameters too.
    assert estimate("INI", peft, SMALL_CLUSTER, SMALL_SETUP).comm_bytes["param_gather"]["intra"] == 8000


def test_feasibility_masking_and_order() -> None:
    model = ModelSizes(params=1_000_000, blocks=4)
    loose = Cluster(nodes=2, ranks_per_node=4, intra_bw=1e9, inter_bw=1e8, device_memory=1e12)
    totals = {e.strategy.code: e.total_memory for e in plan(model, loose)}
    distinct = sorted(set(totals.values()))
    limit = (distinct[len(distinct) // 2 - 1] + distinct[len(distinct) // 2]) / 2  # about half fit
    ranking = plan(model, Cluster(nodes=2, ranks_per_node=4, intra_bw=1e9, inter_bw=1e8, device_memory=limit))
    assert len(ranking) == 14 and {e.strategy for e in ranking} == set(ParoStrategy.all_valid())
    fits = {e.strategy.code for e in ranking if e.fits}
    assert fits == {code for code, t in totals.items() if t <= limit} and "GGG" in fits and "NNN" not in fits
    flags = [e.fits for e in ranking]
    assert flags == sorted(flags, reverse=True)  # every fitting strategy before every other
    fitting = [e for e in ranking if e.fits]
    # By time; equal times by memory.
    for a, b in zip(fitting, fitting[1:]):
        assert a.step_seconds < b.step_seconds or (a.step_seconds == pytest.approx(b.step_seconds)
                                                   and a.total_memory <= b.total_memory)
    table = format_table(ranking).splitlines()
    assert len(table) == 15
    assert table[1].split()[0] == "1" and table[-1].split()[0] == "-" and table[-1].split()[-1] in ("no", "*")


def test_choose_strategy_raises_when_nothing_fits() -> None:
    tiny = Cluster(nodes=2, ranks_per_node=2, intra_bw=1e9, inter_bw=1e8, device_memory=1000)
    # GGG: params 1000 + grads 1000 + optimizer 2000 + buffers 2 x (100 + 100) x 4 = 5600 B.
    with pytest.raises(ValueError, match=r"fits in 1e\+03 B of device memory per rank: the smallest, GGG, "
                                         r"needs 5.47 KiB \(params 1e\+03 B, grads 1e\+03 B, optim 1.95 KiB, "
                                         r"buffers 1.56 KiB, activations 0 B\)"):
        choose_strategy(ModelSizes(params=1000, blocks=10), tiny)


def test_degenerate_meshes() -> None:
    one_node = Cluster(nodes=1, ranks_per_node=4, intra_bw=1e9, inter_bw=1e8, device_memory=1e12)
    iig, ggg = (estimate(c, SMALL_MODEL, one_node, SMALL_SETUP) for c in ("IIG", "GGG"))
    assert iig.effective.code == "GGG" and iig.comm_bytes == ggg.comm_bytes and iig.inter_bytes == 0
    assert iig.step_seconds == pytest.approx(ggg.step_seconds)
    one_rank = Cluster(nodes=4, ranks_per_node=1, intra_bw=1e9, inter_bw=1e8, device_memory=1e12)
    iii = estimate("III", SMALL_MODEL, one_rank, SMALL_SETUP)
    assert iii.effective.code == "NNN" and iii.intra_bytes == 0 and iii.collectives == \
        estimate("NNN", SMALL_MODEL, one_rank, SMALL_SETUP).collectives


def test_assumptions_state_the_dtypes_each_layout_moves() -> None:
    def dtypes(model: ModelSizes) -> str:
        return next(line for line in describe_assumptions(model, SMALL_CLUSTER, SMALL_SETUP, "default")
                    if line.startswith("dtypes"))

    fp32 = dtypes(SMALL_MODEL)
    assert "all-gathers 4" in fp32 and "sync_g 4" in fp32 and "master lives at O" not in fp32
    bf16 = dtypes(dataclasses.replace(SMALL_MODEL, gather_bytes=2))
    assert "all-gathers 2" in bf16 and "copy at P is 2-byte and the 4-byte master lives at O" in bf16
    assert "(K = 12)" in bf16


def test_pareto_front() -> None:
    ranking = plan(ModelSizes(params=7_000_000_000, blocks=32), Cluster(4, 8, 150e9, 3e9, 80 * GIB))
    front = pareto_front(ranking)
    assert front[0].total_memory == min(e.total_memory for e in ranking)
    assert all(a.step_seconds > b.step_seconds for a, b in zip(front, front[1:]))
    for e in ranking:  # everything off the front is dominated by something on it
        assert e in front or any(f.total_memory <= e.total_memory and f.step_seconds <= e.step_seconds
                                 for f in front)


# The paper's settings: nodes of 8 GPUs with 80 GiB, 2-byte compute and gradients with an fp32
# master (a 2-byte copy at P and K = 12 where P is coarser than O), a 200 Gbit/s NIC per node
# shared by 8 ranks, NVLink-class intra links, A = 4.
def _paper(params: int, trainable: int | None, nodes: int, blocks: int, memory_gib: float, comm: str):
    model = ModelSizes(params=params, trainable=trainable, blocks=blocks, param_bytes=4, gather_bytes=2,
                       grad_bytes=2, optim_bytes=8)
    cluster = Cluster(nodes=nodes, ranks_per_node=8, intra_bw=150e9, inter_bw=200e9 / 8 / 8,
                      device_memory=memory_gib * GIB, intra_latency=20e-6, inter_latency=50e-6)
    return choose_strategy(model, cluster, TrainingSetup(accum=4, activation_bytes=20 * GIB), comm)


@pytest.mark.parametrize("comm", ["default", "ho_ring"])
@pytest.mark.parametrize("params,nodes,blocks,memory,expected", [
    (65_000_000_000, 16, 80, 80, "IIG"),  # 65B on 128 GPUs: P=N does not fit
    (7_000_000_000, 4, 32, 40, "NIG"),  # 7B on 32 GPUs with 40 GiB: N gradients do not fit
])
def test_full_training_prefers_group_gradients(comm: str, params: int, nodes: int, blocks: int, memory: float,
                                               expected: str) -> None:
    best, ranking = _paper(params, None, nodes, blocks, memory, comm)
    order = [e.strategy.code for e in ranking]
    assert best.code == expected
    assert order.index("IIG") < order.index("GGG") and order.index("NIG") < order.index("NGG")
    assert order.index(expected) < order.index("GGG")


@pytest.mark.parametrize("fraction", [1 / 16, 3 / 1000])
def test_peft_prefers_group_params_with_full_gradients(fraction: float) -> None:
    psi = 65_000_000_000
    for comm in ("default", "ho_ring"):
        best, ranking = _paper(psi, round(psi * fraction), 16, 80, 80, comm)
        order = [e.strategy.code for e in ranking]
        # I parameters, unpartitioned gradients of the few trainable ones: INI or ING. They move the
        # same bytes; ING's once-per-step parameter sync adds an inter latency per unit, which
        # HO-Ring's overlap of ING's global gradient reduce-scatter about repays at Psi/16. At
        # 3/1000 the trainable states are so small that IIG, whose sync_p moves the 2-byte copy,
        # ties with them (within 1%).
        ing = next(e for e in ranking if e.strategy.code == "ING")
        if fraction == 1 / 16:
            assert best.code in ("INI", "ING")
        else:
            assert best.code in ("INI", "ING", "IIG") and ing.step_seconds <= ranking[0].step_seconds * 1.01
        assert order.index("ING") < min(order.index("IGG"), order.index("GNG"), order.index("GGG"))
        if fraction == 1 / 16 and comm == "ho_ring":
            assert ing.step_seconds <= ranking[0].step_seconds * 1.001


def test_input_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"ModelSizes.trainable \(2000\) must not exceed ModelSizes.params \(1000\)"):
        ModelSizes(params=1000, trainable=2000)
    with pytest.raises(ValueError, match=r"Cluster.inter_bw must be a finite number > 0, got -1"):
        Cluster(nodes=2, ranks_per_node=2, intra_bw=1.0, inter_bw=-1, device_memory=1.0)
    with pytest.raises(ValueError, match=r"TrainingSetup.accum must be an integer >= 1, got 0"):
        TrainingSetup(accum=0)
    with pytest.raises(ValueError, match=r"comm='ring' is invalid; valid values: default, ho_ring"):
        estimate("GGG", SMALL_MODEL, SMALL_CLUSTER, comm="ring")


def test_probed_ho_ring_cost_replaces_the_assumed_latencies() -> None:
    big = ModelSizes(params=2**24, blocks=2)  # 32 MiB units: cut into DEFAULT_CHUNKS chunks
    setup = TrainingSetup(accum=1)
    intra, inter = 2**26 / 100.0, 2**25 / 10.0  # GGG's gathers, as in the test above
    latencies = 6 * 0.5 + 6 * 1.0  # 2 calls x 3 units per link, paid once per collective
    probed = dataclasses.replace(SMALL_CLUSTER, ho_ring_cost={"all_gather": HORingCost(fixed=0.5, per_chunk=0.2)})
    for depth in (4, DEFAULT_CHUNKS):
        e = estimate("GGG", big, probed, setup, comm="ho_ring", ho_ring_chunks=depth)
        # Each of the 6 global gathers pays 0.5 s for being cut and 0.2 s per chunk after the first.
        assert e.comm_seconds_by_phase["param_gather"] == pytest.approx(
            inter + intra / depth + latencies + 6 * (0.5 + (depth - 1) * 0.2))
        assert e.collectives == depth * estimate("GGG", big, probed, setup).collectives
        # A kind the probe did not time (the reductions) keeps paying each link's latency per chunk.
        assert e.comm_seconds_by_phase["grad_reduce"] == pytest.approx(
            estimate("GGG", big, SMALL_CLUSTER, setup, comm="ho_ring", ho_ring_chunks=depth)
            .comm_seconds_by_phase["grad_reduce"])
    # An uncut collective (depth 1) costs what the two phases cost.
    assert estimate("GGG", big, probed, setup, comm="ho_ring", ho_ring_chunks=1).comm_seconds_by_phase == \
        pytest.approx(estimate("GGG", big, probed, setup).comm_seconds_by_phase)
    # A negative cost (finer chunks measured faster than the overlap term credits) never takes a
    # collective below the busier link's transfer.
    gaining = dataclasses.replace(SMALL_CLUSTER, ho_ring_cost={"all_gather": HORingCost(0.0, -1e9)})
    assert estimate("GGG", big, gaining, setup, comm="ho_ring").comm_seconds_by_phase["param_gather"] == \
        pytest.approx(inter + latencies)
    # With the cost measured, auto picks the depth the measurement favours, where the assumed
    # latencies (50 ms per chunk per link) make it pick the two-phase collectives; a measured
    # cost of cutting at all outweighs the overlap again.
    model = ModelSizes(params=400_000_000, blocks=8)
    costly_calls = Cluster(nodes=2, ranks_per_node=4, intra_bw=1e11, inter_bw=1e11, device_memory=1e12,
                           intra_latency=0.05, inter_latency=0.05)
    assert best_collectives("GGG", model, costly_calls, setup).comm == "default"
    free = HORingCost(0.0, 0.0)
    cheap_chunks = dataclasses.replace(costly_calls, ho_ring_cost={"all_gather": free, "reduce_scatter": free})
    chosen = best_collectives("GGG", model, cheap_chunks, setup)
    assert (chosen.comm, chosen.ho_ring_chunks) == ("ho_ring", 16)
    costly_cut = HORingCost(1.0, 0.0)
    assert best_collectives("GGG", model, dataclasses.replace(
        cheap_chunks, ho_ring_cost={"all_gather": costly_cut, "reduce_scatter": costly_cut}), setup).comm == "default"
    assert "the probed cost of cutting it, fixed + (C - 1) x per chunk (all_gather 0 us + 0 us, reduce_scatter" in \
        "\n".join(describe_assumptions(model, cheap_chunks, setup, "auto"))
    with pytest.raises(ValueError, match="Cluster.ho_ring_cost must map a collective kind"):
        dataclasses.replace(costly_calls, ho_ring_cost={"ring": free})
    for bad in (math.nan, True, "1"):
        with pytest.raises(ValueError, match="HORingCost.per_chunk must be a finite number of seconds"):
            HORingCost(0.0, bad)


def test_calibration_fit_and_file(tmp_path) -> None:
    fit = fit_link([(b, 2e-5 + b / 5e8) for b in (1e3, 1e5, 1e6)])
    assert fit.latency == pytest.approx(2e-5) and fit.bandwidth == pytest.approx(5e8)
    with pytest.raises(ValueError, match="do not grow with size"):
        fit_link([(1e3, 1.0), (1e6, 0.5)])
    with pytest.raises(ValueError, match=">= 2 distinct sizes"):
        fit_link([(1e3, 1.0)])
    # Two-phase 0.4 s with 0.08 s of overlap to gain (min(a, b)); HO-Ring pays 10 ms to cut and
    # 2 ms per chunk after the first: 0.4 - 0.08 (1 - 1/C) + 0.01 + 0.002 (C - 1).
    timed = [(c, 0.4 - 0.08 * (1 - 1 / c) + 0.01 + 0.002 * (c - 1)) for c in (2, 4, 16)]
    assert dataclasses.astuple(fit_ho_ring_cost(timed, 0.4, overlap_seconds=0.08)) == pytest.approx((0.01, 0.002))
    assert fit_ho_ring_cost(timed, 0.4, overlap_seconds=0.0).per_chunk < 0.002  # overlap left in: cheaper chunks
    for bad in ([(4, 0.3), (4, 0.31)], [(1, 0.3), (4, 0.31)]):
        with pytest.raises(ValueError, match=">= 2 distinct depths >= 2"):
            fit_ho_ring_cost(bad, 0.4, 0.0)
    cal = Calibration(nodes=2, ranks_per_node=4, intra=fit, inter=LinkFit(1e-4, 1e7),
                      ops={"reduce_scatter": {"inter": LinkFit(1e-4, 5e6)}}, backend="gloo", device_type="cpu",
                      points={"all_gather": {"intra": [(1e3, 0.1), (2e3, 0.2)]}},
                      ho_ring_cost={"all_gather": HORingCost(0.01, 0.002)},
                      ho_ring_points={"all_gather": [(0, 0.4), *timed[:2]]})
    path = tmp_path / "cal.json"
    write_calibration(cal, path)
    assert read_calibration(path) == cal
    cluster = cluster_from_calibration(cal, device_memory=GIB)
    assert (cluster.inter_bw, cluster.bandwidth("reduce_scatter", "inter"), cluster.bandwidth("all_reduce", "inter"),
            cluster.inter_latency) == (1e7, 5e6, 1e7, 1e-4)
    assert cluster.ho_ring_cost == {"all_gather": HORingCost(0.01, 0.002)}
    data = json.loads(path.read_text())
    older = {k: v for k, v in data.items() if k not in ("ho_ring_cost", "ho_ring_points")}  # before HO-Ring was probed
    path.write_text(json.dumps(older))
    assert cluster_from_calibration(read_calibration(path), GIB).ho_ring_cost == {}
    for broken, message in (
        ({**data, "format_version": 99}, "format_version is 99; this version reads 1"),
        ({k: v for k, v in data.items() if k != "inter"}, "a field is missing or malformed: KeyError\\('inter'\\)"),
        ({**data, "inter": {"latency": 0.0, "bandwidth": 0.0}}, "bandwidth must be a finite number of bytes/s > 0"),
        ({**data, "ho_ring_cost": {"all_gather": {"fixed": 0.0}}}, "a field is missing or malformed: TypeError"),
    ):
        path.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=message):
            read_calibration(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_calibration(path)
    with pytest.raises(FileNotFoundError, match="paro_fsdp probe --out"):
        read_calibration(tmp_path / "missing.json")


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.layers = nn.ModuleDict({"0": nn.Linear(4, 4), "1": nn.Linear(4, 8)})
        self.out = nn.Linear(8, 10, bias=False)
        self.emb.weight.requires_grad_(False)


def test_sizes_from_model() -> None:
    sizes = sizes_from_model(_Tiny())
    assert (sizes.params, sizes.trainable, sizes.blocks, sizes.block_params) == (40 + 20 + 40 + 80, 140, 2, 40)
    with pytest.raises(ValueError, match="no `layers` blocks"):
        sizes_from_model(nn.Linear(2, 2))


@needs_torchtitan
def test_torchtitan_config(tmp_path) -> None:
    cfg = tmp_path / "job.toml"
    cfg.write_text('[model]\nname = "llama3"\nflavor = "debugmodel"\n'
                   '[training]\nlocal_batch_size = 2\nglobal_batch_size = 16\nseq_len = 128\n'
                   '[activation_checkpoint]\nmode = "full"\n')
    job = read_torchtitan_job(cfg)
    # debugmodel: dim 256, 6 layers, vocab 2048, untied embeddings (torchtitan reports 6,163,712).
    assert (job.model.params, job.model.blocks, job.dim) == (6_163_712, 6, 256)
    assert job.model.gather_bytes == 2 and job.model.reduce_bytes == 4  # bfloat16 / float32 defaults
    assert job.accum(4) == 2 and job.tokens_per_micro_step == 256
    assert job.activation_bytes() == 6 * 2 * 256 * 256 + 34 * 256 * 256
    with pytest.raises(ValueError, match=r"must be a multiple of .* \(2 \* 3\)"):
        job.accum(3)
    cfg.write_text('[model]\nname = "llama3"\nflavor = "9T"\n')
    with pytest.raises(ValueError, match=r"model.flavor = '9T' is not a flavor of 'llama3'; valid: debugmodel"):
        read_torchtitan_job(cfg)


# Command line ---------------------------------------------------------------------------------

CLI = ["plan", "--params", "7B", "--nodes", "4", "--ranks-per-node", "8", "--intra-bw", "150", "--inter-bw", "3",
       "--memory", "40", "--accum", "4", "--activation-memory", "10"]


def test_cli_table(capsys) -> None:
    assert main([*CLI, "--gather-bytes", "4"]) == 0  # fp32 compute: the copy at P is the master everywhere
    out = capsys.readouterr().out
    assert "# cluster: 4 nodes x 8 ranks = 32 ranks; per rank: intra 150 GB/s" in out
    rows = [line for line in out.splitlines() if line and not line.startswith(("#", "rank", "best"))]
    assert len(rows) == 14
    # fp32 parameters: NIG would hold 26 GiB of them and needs 42.6 GiB in all.
    assert out.splitlines()[-1] == "best that fits: IIG"
    nig = next(r for r in rows if r.split()[1] == "NIG")
    assert nig.split()[0] == "-" and nig.split()[9] == "42.596" and " no " in nig
    assert any(r.split()[:3] == ["-", "NNN", "ddp"] and " no " in r for r in rows)
    # bf16 compute (the default): NIG's copy at P is bf16 and its fp32 master lives at O, so it fits.
    assert main(CLI) == 0
    out = capsys.readouterr().out
    nig = next(line for line in out.splitlines() if line.split()[1:2] == ["NIG"])
    assert out.splitlines()[-1] == "best that fits: NIG" and " yes " in nig


def test_cli_calibration_and_plot(capsys, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    cal = tmp_path / "cal.json"
    write_calibration(Calibration(nodes=2, ranks_per_node=2, intra=LinkFit(1e-4, 2e9), inter=LinkFit(3e-4, 5e7)), cal)
    png = tmp_path / "plan.png"
    assert main(["plan", "--params", "1B", "--trainable", "1/16", "--calibration", str(cal), "--memory", "80",
                 "--comm", "ho_ring", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "Psi' = 62,500,000 trainable" in out
    assert "2 nodes x 2 ranks = 4 ranks; per rank: intra 2 GB/s + 100 us per collective, inter 50 MB/s + 300 us" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


QUANT = InterQuant(params="int8", grads="int8")


def test_quantized_traffic_is_priced_in_bytes_and_quantize_time() -> None:
    cluster = dataclasses.replace(SMALL_CLUSTER, quant_rate=50.0)
    exact = estimate("IIG", SMALL_MODEL, cluster, SMALL_SETUP)
    quant = estimate("IIG", SMALL_MODEL, cluster, SMALL_SETUP, quant=QUANT)
    topo = Topology(2, 2)
    m = SMALL_MODEL
    assert quant.comm_bytes == comm_bytes("IIG", topo, 1000, accum=2, param_bytes=m.wire_param_bytes,
                                          grad_bytes=m.wire_grad_bytes, master_bytes=m.master_bytes,
                                          sync_p_bytes=m.layout(ParoStrategy.parse("IIG")).sync_p, quant=QUANT)
    assert quant.inter_bytes == pytest.approx(exact.inter_bytes * (1 + 4 / 256) / 4)
    assert quant.intra_bytes == exact.intra_bytes and quant.label == "IIG+p8g8" and exact.label == "IIG"
    # fp32 everywhere: exact IIG's copy at P is the master; quantized, P holds dequantized values and
    # the fp32 master moves to O beside the moments (K = 8 + 4).
    assert quant.memory["optim"] == exact.memory["optim"] * 12 / 8
    assert estimate("GGG", SMALL_MODEL, cluster, SMALL_SETUP, quant=QUANT).memory == \
        estimate("GGG", SMALL_MODEL, cluster, SMALL_SETUP).memory  # P = O: the master is the copy at P
    elements = comm_elements("IIG", topo, 1000, accum=2)
    for phase in ("sync_g", "sync_p"):  # IIG's inter traffic; each its full size (sent x k/(k-1)) at 50/s
        saved = (exact.comm_bytes[phase]["inter"] - quant.comm_bytes[phase]["inter"]) / cluster.inter_bw
        work = elements[phase]["inter"] * 2 / 50.0
        assert quant.comm_seconds_by_phase[phase] == pytest.approx(exact.comm_seconds_by_phase[phase] - saved + work)
    with pytest.raises(ValueError, match="pricing quantized traffic needs Cluster.quant_rate"):
        estimate("IIG", SMALL_MODEL, SMALL_CLUSTER, SMALL_SETUP, quant=QUANT)


def test_plan_ranks_quantized_variants_beside_the_exact_ones() -> None:
    fast = dataclasses.replace(SMALL_CLUSTER, quant_rate=1e12)
    ranking = plan(SMALL_MODEL, fast, SMALL_SETUP, quant=QUANT)
    assert len(ranking) == 28 and len({e.label for e in ranking}) == 28
    assert ranking[0].quant == QUANT  # a slow inter link and free quantization: a quantized variant wins
    slow = dataclasses.replace(SMALL_CLUSTER, quant_rate=1e-3)
    assert plan(SMALL_MODEL, slow, SMALL_SETUP, quant=QUANT)[0].quant is None  # quantizing costs more than it saves
    best, only_quantized = choose_strategy(SMALL_MODEL, fast, SMALL_SETUP, quant=QUANT)
    assert len(only_quantized) == 14 and all(e.quant == QUANT for e in only_quantized)
    assert best == only_quantized[0].strategy
    assert any("quantized inter-group traffic (p8g8" in line
               for line in describe_assumptions(SMALL_MODEL, fast, SMALL_SETUP, "default", quant=QUANT))


def test_cli_ranks_quantized_variants(capsys, tmp_path) -> None:
    with pytest.raises(SystemExit):
        main([*CLI, "--quant-grads", "int8"])
    assert "--quant-params / --quant-grads need the rate a rank quantizes at" in capsys.readouterr().err
    assert main([*CLI, "--quant-params", "int8", "--quant-grads", "int4", "--quant-rate", "50000"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line and not line.startswith(("#", "rank", "best"))]
    assert len(rows) == 28 and sum("+p8g4" in r for r in rows) == 14
    assert "quantize + dequantize at 5e+04 M elements/s per rank" in out
    with pytest.raises(SystemExit):
        main([*CLI, "--quant-grads", "int8", "--quant-rate", "1", "--quant-block-size", "7"])
    assert "--quant-*: block_size=7 is invalid" in capsys.readouterr().err
    assert main([*CLI, "--quant-grads", "int4", "--quant-rate", "1", "--quant-error-feedback"]) == 0
    assert "+g4e " in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--params", "7x"], "argument --params: expected a parameter count such as 7000000000, 6.7e9, 7B or 350M, "
                         "got '7x'"),
    (["--nodes", "0"], "argument --nodes: expected an integer >= 1, got '0'"),
    (["--inter-bw", "-3"], "argument --inter-bw: expected a number > 0, got '-3'"),
    (["--trainable", "2/1"], "argument --trainable: a fraction of --params must be in (0, 1], got '2/1'"),
    (["--trainable", "8B"], "--trainable: 8000000000 trainable parameters exceed the 7000000000 parameters"),
    (["--config", "x.toml"], "give the model as exactly one of --config TOML (a torchtitan job) or --params COUNT"),
    (["--device-tflops", "100"], "--device-tflops needs --tokens (tokens per rank per micro-step) or --config"),
    (["--calibration", "/nonexistent.json"], "--calibration: calibration file '/nonexistent.json' does not exist"),
])
def test_cli_errors(capsys, argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(CLI + argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@needs_torchtitan
def test_cli_ho_ring_chunks_from_the_flag_or_the_toml(capsys, tmp_path) -> None:
    assert main([*CLI, "--comm", "ho_ring", "--ho-ring-chunks", "4"]) == 0
    assert "(C <= 4), costs max(intra, inter)" in capsys.readouterr().out
    cfg = tmp_path / "job.toml"
    cfg.write_text('[model]\nname = "llama3"\nflavor = "debugmodel"\n'
                   '[parallelism]\nparo_comm = "ho_ring"\nparo_ho_ring_chunks = 2\n')
    cluster = ["--nodes", "2", "--ranks-per-node", "2", "--intra-bw", "150", "--inter-bw", "3", "--memory", "40"]
    assert main(["plan", "--config", str(cfg), *cluster]) == 0
    assert "(C <= 2), costs" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["plan", "--config", str(cfg), *cluster, "--comm", "default"])
    assert ("parallelism.paro_ho_ring_chunks=2 is HO-Ring's pipeline depth, valid only with --comm='ho_ring', "
            "but --comm='default'") in capsys.readouterr().err


def test_comm_auto_prices_every_collectives_choice_and_keeps_the_fastest() -> None:
    assert collectives_candidates("auto") == [("default", None), ("ho_ring", 2), ("ho_ring", 4), ("ho_ring", 8),
                                              ("ho_ring", 16)]
    assert collectives_candidates("ho_ring", 4) == [("ho_ring", 4)] and collectives_candidates("default") == [
        ("default", None)]
    with pytest.raises(ValueError, match=r"--hrc=4 is invalid with --c='auto' \(the planner chooses the depth\): "
                                         r"leave --hrc unset, or set --c='ho_ring'"):
        collectives_candidates("auto", 4, "--c", "--hrc")
    with pytest.raises(ValueError, match="comm='ring' is invalid; valid values: default, ho_ring, auto"):
        collectives_candidates("ring")
    model = ModelSizes(params=400_000_000, blocks=8)  # 50M-parameter blocks: 200 MB collectives, cut 16 ways
    setup = TrainingSetup(accum=1)
    # Two links of equal speed and no latency: HO-Ring's overlap halves a global collective,
    # and the deepest pipeline overlaps most.
    balanced = Cluster(nodes=2, ranks_per_node=4, intra_bw=1e9, inter_bw=1e9, device_memory=1e12)
    # A fast network whose collectives each cost 50 ms: every chunk pays it, two-phase wins.
    costly_calls = dataclasses.replace(balanced, intra_bw=1e11, inter_bw=1e11, intra_latency=0.05, inter_latency=0.05)
    for cluster, want in ((balanced, ("ho_ring", 16)), (costly_calls, ("default", None))):
        chosen = best_collectives("GGG", model, cluster, setup)
        every = [estimate("GGG", model, cluster, setup, c, d) for c, d in collectives_candidates("auto")]
        assert (chosen.comm, chosen.ho_ring_chunks) == want
        assert chosen.step_seconds == min(e.step_seconds for e in every)
        assert chosen.collectives_label == ("default" if want[0] == "default" else f"ho_ring/{want[1]}")
    # A strategy with no global collective costs the same either way: the tie goes to two-phase.
    assert best_collectives("IIG", model, balanced, setup).comm == "default"
    ranking = plan(model, balanced, setup, "auto")
    assert {e.strategy.code: e.collectives_label for e in ranking}["GGG"] == "ho_ring/16"
    assert "comm = auto: each strategy priced with the two-phase collectives (default) and HO-Ring at depth C in " \
           "{2, 4, 8, 16}" in "\n".join(describe_assumptions(model, balanced, setup, "auto"))


def test_cli_comm_auto(capsys) -> None:
    assert main([*CLI, "--comm", "auto"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("rank"))
    assert "global collectives" in header and "comm = auto: each strategy priced" in out
    rows = [line.split() for line in out.splitlines() if line and not line.startswith(("#", "rank", "best"))]
    assert len(rows) == 14 and all(r[12] == "default" or r[12].startswith("ho_ring/") for r in rows)
    with pytest.raises(SystemExit):
        main([*CLI, "--comm", "auto", "--ho-ring-chunks", "4"])
    assert "--ho-ring-chunks=4 is invalid with --comm='auto'" in capsys.readouterr().err


def test_cli_missing_cluster_flag_and_nothing_fits(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["plan", "--params", "7B", "--nodes", "2", "--memory", "8"])
    assert "--ranks-per-node is required (or --calibration FILE from `paro probe`, or --config" in capsys.readouterr().err
    assert main(CLI[:-6] + ["--memory", "1"]) == 1
    assert "nothing fits in 1 GiB per rank; the smallest, GGG, needs" in capsys.readouterr().out


# Probe on a 2x2 gloo mesh ----------------------------------------------------------------------

def _probe(path: str) -> Calibration:
    import torch.distributed as dist

    from paro_fsdp.probe import run_probe

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate", "dp_shard"))
    # 4 MiB: bandwidth-bound even on loopback; the median of 3 keeps one scheduling hiccup out of the fit
    cal = run_probe(mesh, sizes=(4096, 2**22), repeats=3)
    if dist.get_rank() == 0:
        write_calibration(cal, path)
    return cal


def test_probe(tmp_path) -> None:
    path = tmp_path / "cal.json"
    cals = run_distributed(_probe, 4, str(path))
    cal = read_calibration(path)
    assert cal.quant_rate > 0 and cluster_from_calibration(cal, 1e9).quant_rate == cal.quant_rate
    assert cal == cals[0]  # rank 0 wrote what it measured; every rank fits the same (MAX-reduced) times
    assert all(c.intra == cal.intra and c.inter == cal.inter for c in cals)
    assert (cal.nodes, cal.ranks_per_node, cal.backend, cal.device_type) == (2, 2, "gloo", "cpu")
    assert set(cal.ops) == {"reduce_scatter", "all_reduce"}
    for link in ("intra", "inter"):
        # Over 2 ranks an all-gather or reduce-scatter sends (2-1) x the per-rank size, an all-reduce
        # 2 (2-1) / 2 of it: the same bytes at every size.
        for kind in ("all_gather", "reduce_scatter", "all_reduce"):
            assert [b for b, _ in cal.points[kind][link]] == [4096, 2**22]
            assert all(t > 0 for _, t in cal.points[kind][link])
        fits = [getattr(cal, link), cal.ops["reduce_scatter"][link], cal.ops["all_reduce"][link]]
        assert all(math.isfinite(f.bandwidth) and f.bandwidth > 0 for f in fits)
    # Global gathers and reductions timed two-phase (depth 0) and with HO-Ring at the shallowest
    # and deepest depth the planner picks.
    assert set(cal.ho_ring_cost) == set(cal.ho_ring_points) == {"all_gather", "reduce_scatter"}
    for kind, pts in cal.ho_ring_points.items():
        assert [c for c, _ in pts] == [0, 2, 16] and all(t > 0 for _, t in pts)
        cost = cal.ho_ring_cost[kind]
        assert math.isfinite(cost.fixed) and math.isfinite(cost.per_chunk)


@pytest.mark.parametrize("width, blocks", [(1000, 8), (300, 40), (3000, 4)])
def test_planner_units_are_the_units_paro_parallelize_makes(width, blocks):
    """The planner's unit count and size are those ``bucket_blocks`` makes: where P = N,
    consecutive blocks up to the cap (by default 25 MiB for NNN on one group only); else a unit per block."""
    from paro_fsdp.parallelize import bucket_blocks
    from paro_fsdp.strategy import bucket_bytes

    modules = [nn.Linear(width, width) for _ in range(blocks)]
    block_params = width * width + width
    for cap_mb in (None, 25.0, 0):
        sizes = ModelSizes(params=block_params * blocks, blocks=blocks, block_params=block_params,
                           bucket_cap_mb=cap_mb)
        for code, groups in itertools.product(("NNN", "NIG", "NGG", "IIG", "GGG", "INI"), (1, 2)):
            s = ParoStrategy.parse(code)
            runs = bucket_blocks(modules, bucket_bytes(s, cap_mb, groups))
            assert sizes.units_for(s, groups) == len(runs) + 1, (cap_mb, code, groups)
            assert sizes.unit_params_for(s, groups) == max(len(r) for r in runs) * block_params, (cap_mb, code)
            if code[0] != "N" or cap_mb == 0 or (cap_mb is None and (code != "NNN" or groups > 1)):
                assert len(runs) == blocks, (cap_mb, code, groups)


def test_bucket_cap_is_validated():
    with pytest.raises(ValueError, match=r"ModelSizes.bucket_cap_mb must be a finite number >= 0, got -1"):
        ModelSizes(params=10, bucket_cap_mb=-1)
