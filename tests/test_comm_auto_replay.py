"""``benchmarks.comm_auto_replay``: the replay of ``paro_comm = "auto"`` against measured step
times rebuilds from its saved calibrations, and its gaps are what the measurements say."""

from __future__ import annotations

import dataclasses
import json

import pytest

from benchmarks.comm_auto_replay import (BEFORE, LAUNCHED, MEASURED, evaluate, launched_auto, measured_scenarios,
                                         render, size_class_gain)
from conftest import needs_torchtitan
from paro_fsdp.planner import best_collectives, calibration_from_dict, cluster_from_calibration

SAVED = MEASURED.parent / "comm-auto-replay.json"


@needs_torchtitan
def test_replay_rebuilds_from_the_saved_calibrations_and_its_gaps_follow_the_measurements() -> None:
    measured = measured_scenarios(json.loads(MEASURED.read_text()))
    raw = json.loads(SAVED.read_text())
    rows = evaluate(measured, raw["calibrations"], launched_auto(json.loads(LAUNCHED.read_text())))
    assert len(rows) == len(measured) == 6
    assert all(row["launched"] for row in rows)  # auto launched in every scenario
    labels = {"two-phase": ("default", None), "HO-Ring, 4 chunks": ("ho_ring", 4), "HO-Ring, 16 chunks": ("ho_ring", 16)}
    for row in rows:
        steps = measured[(row["nodes"], row["ranks"], row["rate"])]
        best = min(steps.values())
        assert row["best"] in labels and steps[labels[row["best"]]] == best
        assert row["gap"] == pytest.approx(steps[labels[row["choice"]]] / best - 1)
        assert row["before_gap"] == pytest.approx(steps[BEFORE] / best - 1)
        # the choice among the measured variants is the cheapest estimate among them
        assert row["estimated"][row["choice"]] == min(row["estimated"].values())
        # priced with the probed cost of a chunk, and again with the links' latencies per chunk
        assert set(row["ho_ring_cost"]) == {"all_gather", "reduce_scatter"}
        assert row["assumed_gap"] == pytest.approx(steps[labels[row["assumed_choice"]]] / best - 1)
        assert -1 <= row["spearman"] <= 1
    page = render(rows, raw)
    assert page.count("\n| 2x4 |") == 3 and page.count("\n| 4x2 |") == 3
    assert page == (MEASURED.parent / "comm-auto-replay.md").read_text(), "docs/comm-auto-replay.md is stale: --render"


def test_auto_picks_the_two_phase_collectives_on_the_probed_floor() -> None:
    from paro_fsdp.planner import ModelSizes, TrainingSetup

    raw = json.loads(SAVED.read_text())
    cluster = cluster_from_calibration(calibration_from_dict(raw["calibrations"]["2x4@20gbit"]), device_memory=2**40)
    model = ModelSizes(params=56_640_000, blocks=16)
    chosen = best_collectives("GGG", model, cluster, TrainingSetup(accum=1))
    assert (chosen.comm, chosen.ho_ring_chunks) == ("default", None)  # the floor: every chunk only costs


def test_size_class_gain_is_what_choosing_per_class_saves() -> None:
    """NGG reduces per unit (a reduce-scatter) and syncs once per step (an all-gather): where the
    probe found cutting a reduce-scatter costly and cutting an all-gather free, the two classes
    want different collectives, and choosing per class gains; with one cost for both, nothing."""
    from paro_fsdp.planner import Cluster, HORingCost, ModelSizes, TrainingSetup, estimate

    model, setup = ModelSizes(params=400_000_000, blocks=8), TrainingSetup(accum=1)
    cluster = Cluster(nodes=2, ranks_per_node=4, intra_bw=1e9, inter_bw=1e9, device_memory=1e12)
    split = dataclasses.replace(cluster, ho_ring_cost={"all_gather": HORingCost(0.0, 0.0),
                                                       "reduce_scatter": HORingCost(10.0, 0.0)})
    default, deep = (estimate("NGG", model, split, setup, c, d).comm_seconds_by_phase
                     for c, d in (("default", None), ("ho_ring", 16)))
    # per unit the two-phase reduce-scatter, once per step HO-Ring 16's gather
    per_class = default["param_gather"] + default["grad_reduce"] + deep["sync_g"] + deep["sync_p"]
    assert per_class < min(sum(default.values()), sum(deep.values()))
    assert size_class_gain("NGG", model, split, setup) == pytest.approx(
        min(sum(default.values()), sum(deep.values())) / per_class - 1)
    same = dataclasses.replace(cluster, ho_ring_cost={"all_gather": HORingCost(0.0, 0.0),
                                                      "reduce_scatter": HORingCost(0.0, 0.0)})
    assert size_class_gain("NGG", model, same, setup) == pytest.approx(0.0, abs=1e-12)
    assert size_class_gain("IIG", model, split, setup) == pytest.approx(0.0, abs=1e-12)  # no global collective


def test_an_auto_launch_is_read_as_what_it_ran() -> None:
    """The trainer's "Applied PaRO ..." line says which collectives ``auto`` chose; the replay reads
    it back as the variant label it compares with its own pick."""
    from benchmarks.e2e_report import parse_node_output

    line = ("[rank0]:[titan] INFO - Applied PaRO GGG (ho_ring, at most 8 chunks (chosen by the planner)) on "
            "2 group(s) x 4 rank(s) to the model")
    parsed = parse_node_output([line])
    assert (parsed["applied"], parsed["collectives"]) == ("GGG", "ho_ring, at most 8 chunks (chosen by the planner)")
    probes = [[[k, 2.0 * k, 0, 0, 0] for k in range(1, 7)]]  # a step every 2 s
    runs = [{"nodes": 2, "ranks": 4, "rate": "1gbit", "comm": "auto", "status": "ok", "probes": probes,
             "collectives": parsed["collectives"]},
            {"nodes": 4, "ranks": 2, "rate": "1gbit", "comm": "auto", "status": "ok", "probes": probes,
             "collectives": "default (chosen by the planner)"},
            {"nodes": 4, "ranks": 2, "rate": "250mbit", "comm": "ho_ring", "status": "ok", "probes": probes,
             "collectives": "ho_ring"}]  # not an auto launch
    assert launched_auto({"runs": runs}) == {(2, 4, "1gbit"): ("HO-Ring, 8 chunks", 2.0),
                                             (4, 2, "1gbit"): ("two-phase", 2.0)}
