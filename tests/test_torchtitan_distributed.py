"""torchtitan + PaRO end to end on CPU: loss parity, resume, resharding, TP and PP composition.

The same scenarios run on torchtitan 0.2.2 (the debug TOML) and 0.3 (the config function of
the same name); :mod:`titan_runs` builds each release's command line and trainer.

Each launch is one ``torchrun`` of this file; inside it, torchtitan trainers for several
configurations run one after another on the same process group (tiny debug model, a few
steps), and the last rank writes what it measured to a JSON file the tests read:

- 4 ranks: stock HSDP vs PaRO IIG/HO-Ring on 2x2 (loss curves; 4 steps of IIG, NIG and NNN against
  HSDP and of GGG against FSDP on 1x4, within 1e-5), an interrupted and resumed
  IIG run vs an uninterrupted one, and a checkpoint chain IIG 2x2 -> GGG 1x4 -> NIG 2x2
  (parameters and optimizer state after each load equal those saved; training continues on
  the uninterrupted run's losses); qwen3 (tied embeddings) with PaRO IIG and NNN; ``paro_strategy = "auto"``
  (links probed at start-up, the ranking logged, the chosen strategy trained);
- 8 ranks: TP=2 and PP=2, each with PaRO IIG 2x2 vs torchtitan's stock HSDP 2x2 (4 steps, within
  1e-5), and each with
  IIG in bf16 under selective activation checkpointing, a step-1 checkpoint loaded into the
  running trainer replaying step 2 exactly.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import pytest

from titan_runs import LOSS_RTOL, agree, args, assert_close, curve, launch, max_difference, rank_main, run

# Steps of each run compared with stock torchtitan: step 1 checks the forward on the same
# weights, the later ones each update (gradient scale, sync, weight decay, the LR schedule).
PARITY_STEPS = 4

# ----------------------------------------------------------------------------- rank side


def _scenarios_4(root: Path) -> dict[str, Any]:
    import shutil

    import torch.distributed as dist

    ckpt = ["--checkpoint.enable", "--checkpoint.interval", "2", "--checkpoint.no-last-save-model-only"]

    def load_from(path: Path) -> list[str]:
        return [*ckpt, "--checkpoint.initial_load_path", str(path), "--checkpoint.no-initial-load-model-only"]

    out: dict[str, Any] = {"stock": run(args(root / "stock", PARITY_STEPS, (2, 2), None))["losses"]}
    iig = run(args(root / "iig", PARITY_STEPS, (2, 2), "IIG", *ckpt), snapshot_at=2)
    out["iig"] = iig["losses"]
    # Resume: a fresh trainer picks up the step-2 checkpoint an interrupted job would have left.
    if dist.get_rank() == 0:
        shutil.copytree(root / "iig" / "checkpoint" / "step-2", root / "resumed" / "checkpoint" / "step-2")
    dist.barrier()
    out["resumed"] = run(args(root / "resumed", 4, (2, 2), "IIG", *ckpt))["losses"]
    # Reshard chain: IIG 2x2 (step 2) -> GGG 1x4 (loads it, trains step 3, stops) -> NIG 2x2 (step 4).
    ggg = run(args(root / "ggg", 4, (1, 4), "GGG", *load_from(root / "iig" / "checkpoint" / "step-2")),
               stop_after=3, snapshot_loaded=True)
    nig = run(args(root / "nig", 4, (2, 2), "NIG", *load_from(root / "ggg" / "checkpoint" / "step-3")),
               snapshot_loaded=True)
    out["ggg_losses"], out["nig_losses"] = ggg["losses"], nig["losses"]
    out["iig_to_ggg_diff"] = agree(max_difference(iig["at"], ggg["loaded"]))
    out["ggg_to_nig_diff"] = agree(max_difference(ggg["end"], nig["loaded"]))
    out["optim_keys"] = sum(k.startswith("optim.state.") for k in iig["at"])
    out["iig_scalars"] = iig["scalars"][2]
    out["params"] = sum(v.numel() for k, v in iig["at"].items() if k.startswith("model."))
    # Quantized traffic across groups, switched on from the config (the IIG run above is its exact twin).
    quant = ["--parallelism.paro_quant_params", "int8", "--parallelism.paro_quant_grads", "int8",
             "--parallelism.paro_quant_error_feedback"]
    quant_iig = run(args(root / "quant_iig", 4, (2, 2), "IIG", *ckpt, *quant), snapshot_end=False)
    out["quant_iig"], out["quant_scalars"] = quant_iig["losses"], quant_iig["scalars"][4]
    # Resume it: masters, moments and each rank's error-feedback residuals were saved.
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(root / "quant_iig" / "checkpoint" / "step-2")).read_metadata().state_dict_metadata
    out["quant_residual_ranks"] = sorted({k.split(".rank")[1].split(".")[0] for k in saved
                                          if k.startswith("optimizer.paro_feedback.")})
    if dist.get_rank() == 0:
        shutil.copytree(root / "quant_iig" / "checkpoint" / "step-2", root / "quant_resumed" / "checkpoint" / "step-2")
    dist.barrier()
    out["quant_resumed"] = run(args(root / "quant_resumed", 4, (2, 2), "IIG", *ckpt, *quant),
                               snapshot_end=False)["losses"]
    out["qwen3_iig"] = run(args(root / "qwen3", 3, (2, 2), "IIG", model="qwen3"))["losses"]
    # Bucketed as NNN is by default on one group: the output projection stays in the root's unit.
    out["qwen3_nnn"] = run(args(root / "qwen3_nnn", 3, (2, 2), "NNN", "--parallelism.paro_bucket_cap_mb", "25",
                                model="qwen3"), snapshot_end=False)["losses"]
    # torchtitan's bf16 compute: PaRO keeps a bf16 copy at P and the fp32 master at O.
    bf16 = ["--training.mixed_precision_param", "bfloat16"]
    out["bf16_stock"] = run(args(root / "bf16_stock", 4, (1, 4), None, *bf16))["losses"]
    bf16_iig = run(args(root / "bf16_iig", 4, (2, 2), "IIG", *bf16, *ckpt))
    out["bf16_iig"], out["bf16_scalars"] = bf16_iig["losses"], bf16_iig["scalars"][3]
    # Resume from its step-2 checkpoint: the masters were saved, so steps 3 and 4 are the same
    # (step 4 runs on what step 3's update made of the loaded masters).
    if dist.get_rank() == 0:
        shutil.copytree(root / "bf16_iig" / "checkpoint" / "step-2", root / "bf16_resumed" / "checkpoint" / "step-2")
    dist.barrier()
    out["bf16_resumed"] = run(args(root / "bf16_resumed", 4, (2, 2), "IIG", *bf16, *ckpt))["losses"]
    out["auto"] = _auto(root / "auto")
    # Each PaRO strategy against the stock layout with the same sharding mesh, as many steps as
    # the IIG run above (whose checkpoints do not change its losses) against stock HSDP.
    out["parity"] = {"hsdp": out["stock"], "iig": out["iig"]} | {
        name: run(args(root / f"parity_{name}", PARITY_STEPS, dp, strategy, *extra), snapshot_end=False)["losses"]
        for name, dp, strategy, extra in (
            ("nig", (2, 2), "NIG", ()), ("nnn", (2, 2), "NNN", ()), ("fsdp", (1, 4), None, ()),
            ("ggg", (1, 4), "GGG", ()),
            # NIG with its transformer blocks bucketed from the config (by default a unit per block).
            ("nig_bucketed", (2, 2), "NIG", ("--parallelism.paro_bucket_cap_mb", "25")))
    }
    return out


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _auto(dump: Path) -> dict[str, Any]:
    """``paro_strategy = "auto"``: every rank probes, rank 0 plans and logs, all train its choice.

    The probe stops at its third size (links here are the host's memory: the sizes that make
    them bandwidth-bound would only make the test slow). Returns the losses, every
    rank's PaRO log messages and whether rank 0 wrote the calibration for the next run.
    """
    import torch.distributed as dist

    import paro_fsdp.probe

    messages, sizes = _Messages(), paro_fsdp.probe.ADAPTIVE_SIZES
    logging.getLogger().addHandler(messages)
    paro_fsdp.probe.ADAPTIVE_SIZES = sizes[:3]
    calibration = dump / "paro_calibration.json"
    try:
        losses = run(args(dump, 2, (2, 2), "auto", "--parallelism.paro_comm", "auto"))["losses"]
        written: list[Any] = [calibration.is_file()]
        dist.broadcast_object_list(written, src=0)
        # A set strategy with paro_comm = "auto": only its collectives are chosen, here from the
        # calibration the run above wrote (no probe).
        run(args(dump.with_name(dump.name + "_nig"), 1, (2, 2), "NIG", "--parallelism.paro_comm", "auto",
                 "--parallelism.paro_calibration", str(calibration)))
    finally:
        paro_fsdp.probe.ADAPTIVE_SIZES = sizes
        logging.getLogger().removeHandler(messages)
    logs: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(logs, [m for m in messages.messages if "PaRO" in m])
    return {"losses": losses, "logs": logs, "calibration_written": written[0]}


def _scenarios_8(root: Path) -> dict[str, Any]:
    tp = ["--parallelism.tensor_parallel_degree", "2"]
    pp = ["--parallelism.pipeline_parallel_degree", "2", "--training.local_batch_size", "2",
          "--training.global_batch_size", "8"]
    out: dict[str, Any] = {
        f"{name}_{(strategy or 'stock').lower()}": run(
            args(root / f"{name}_{strategy}", PARITY_STEPS, (2, 2), strategy, *extra), snapshot_end=False)["losses"]
        for name, extra in (("tp", tp), ("pp", pp))
        for strategy in (None, "IIG")
    }
    # bf16 copies at P under activation checkpointing, in TP-sharded and pipeline-stage model
    # parts: the masters' checkpoint keys and their load, replayed from a step-1 checkpoint.
    bf16_ac = ["--training.mixed_precision_param", "bfloat16", "--checkpoint.enable", "--checkpoint.interval", "1",
               "--checkpoint.no-last-save-model-only"]
    for name, extra in (("tp", tp), ("pp", pp)):
        got = run(args(root / f"{name}_bf16_ac", 2, (2, 2), "IIG", *extra, *bf16_ac, ac="selective"),
                  replay_from=1, snapshot_end=False)
        out[f"{name}_bf16_ac"] = {"losses": curve(got["losses"]), "replayed": curve(got["replayed"])}
    return out


# ----------------------------------------------------------------------------- test side


@pytest.fixture(scope="module")
def four(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return launch(__file__, 4, tmp_path_factory.mktemp("tt4"), "4")


@pytest.fixture(scope="module")
def eight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return launch(__file__, 8, tmp_path_factory.mktemp("tt8"), "8")


def test_paro_matches_stock_hsdp_and_learns(four: dict[str, Any]) -> None:
    stock, iig = curve(four["stock"]), curve(four["iig"])
    assert_close(iig, stock)
    assert iig[-1] < iig[0] - 0.5


@pytest.mark.parametrize(("strategy", "stock"), [("iig", "hsdp"), ("nig", "hsdp"), ("nnn", "hsdp"),
                                                ("nig_bucketed", "hsdp"), ("ggg", "fsdp")])
def test_every_step_equals_stock_torchtitan(four: dict[str, Any], strategy: str, stock: str) -> None:
    """IIG, NIG and NNN against stock HSDP on 2 x 2, GGG against stock FSDP on 1 x 4, HO-Ring,
    fp32. On 2 groups NNN keeps a unit per block by default; with ``paro_bucket_cap_mb`` set,
    NIG's transformer blocks share one unit and the embeddings and output projection stay with
    the root's, where on torchtitan 0.3 the chunked loss's per-chunk backwards reach the
    projection before the unit's backward begins."""
    paro, reference = curve(four["parity"][strategy]), curve(four["parity"][stock])
    assert len(paro) == PARITY_STEPS
    assert_close(paro, reference, rtol=1e-5)


def test_resumed_run_continues_with_the_same_losses(four: dict[str, Any]) -> None:
    full, resumed = four["iig"], four["resumed"]
    assert sorted(resumed, key=int) == ["3", "4"]
    for step in ("3", "4"):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=0)


def test_checkpoint_reshards_across_strategies_and_layouts(four: dict[str, Any]) -> None:
    assert four["optim_keys"] > 0, "optimizer state missing from the snapshots"
    assert four["iig_to_ggg_diff"][0] == 0.0, four["iig_to_ggg_diff"]
    assert four["ggg_to_nig_diff"][0] == 0.0, four["ggg_to_nig_diff"]
    assert four["ggg_losses"]["3"] == pytest.approx(four["iig"]["3"], rel=LOSS_RTOL)
    assert four["nig_losses"]["4"] == pytest.approx(four["iig"]["4"], rel=LOSS_RTOL)


def test_paro_metrics_report_the_expected_bytes_and_memory(four: dict[str, Any]) -> None:
    # IIG on g=2 groups of m=2, fp32: per step, sync_g reduce-scatters and sync_p all-gathers
    # across groups (g-1)/n of the model each; parameters and gradients are held at 1/m,
    # AdamW's two moments at 1/n. FSDP pads shards, hence the small tolerance.
    scalars, model_bytes = four["iig_scalars"], 4 * four["params"]
    assert scalars["paro/comm_inter_bytes_per_step"] == pytest.approx(2 * model_bytes / 4, rel=0.01)
    assert scalars["paro/comm_inter_bytes/sync_g"] == pytest.approx(model_bytes / 4, rel=0.01)
    assert scalars["paro/comm_inter_bytes/param_gather"] == 0
    assert scalars["paro/comm_intra_bytes/param_gather"] > 0
    assert scalars["paro/memory_params_bytes"] == pytest.approx(model_bytes / 2, rel=0.01)
    assert scalars["paro/memory_optim_bytes"] == pytest.approx(2 * model_bytes / 4, rel=0.01)


def test_quantized_traffic_is_a_quarter_across_groups_and_trains_like_the_exact_run(four: dict[str, Any]) -> None:
    # int8 with an fp32 scale per 256 elements: 1 + 4/256 bytes per element where fp32 sends 4.
    scalars, model_bytes = four["quant_scalars"], 4 * four["params"]
    per_element = (1 + 4 / 256) / 4
    assert scalars["paro/comm_inter_bytes_per_step"] == pytest.approx(2 * model_bytes / 4 * per_element, rel=0.03)
    assert scalars["paro/comm_inter_quantized_bytes_per_step"] == scalars["paro/comm_inter_bytes_per_step"]
    assert scalars["paro/comm_intra_bytes_per_step"] == pytest.approx(four["iig_scalars"]["paro/comm_intra_bytes_per_step"])
    quantized, exact = curve(four["quant_iig"]), curve(four["iig"])
    assert quantized != exact, "nothing was quantized"
    assert_close(quantized, exact, rtol=1e-2)


def test_quantized_run_with_error_feedback_resumes_with_the_same_losses(four: dict[str, Any]) -> None:
    assert four["quant_residual_ranks"] == ["0", "1", "2", "3"], "every rank's residuals are in the checkpoint"
    full, resumed = four["quant_iig"], four["quant_resumed"]
    assert sorted(resumed, key=int) == ["3", "4"]
    for step in resumed:
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=0)


def test_bf16_compute_keeps_a_bf16_copy_at_p_and_trains_like_stock_fsdp(four: dict[str, Any]) -> None:
    assert_close(curve(four["bf16_iig"]), curve(four["bf16_stock"]), rtol=1e-3)
    assert sorted(four["bf16_resumed"], key=int) == ["3", "4"]
    for step in ("3", "4"):
        assert four["bf16_resumed"][step] == pytest.approx(four["bf16_iig"][step], rel=1e-6, abs=0)
    # IIG on 2x2: a 2-byte copy at P = I (1/m), AdamW's moments and the 4-byte master at O = G (1/n).
    scalars, params = four["bf16_scalars"], four["params"]
    assert scalars["paro/memory_params_bytes"] == pytest.approx(2 * params / 2, rel=0.01)
    assert scalars["paro/memory_optim_bytes"] == pytest.approx(12 * params / 4, rel=0.01)
    assert scalars["paro/comm_inter_bytes/sync_p"] == pytest.approx(2 * params / 4, rel=0.01)


def test_qwen3_trains_with_paro(four: dict[str, Any]) -> None:
    # Stock qwen3 debugmodel (tied embeddings) does not run under torch 2.13's FSDP2, which
    # rejects the shared weight across units; PaRO keeps tied weights in one unit.
    losses = curve(four["qwen3_iig"])
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5
    # NNN computes on the tied weight in place, in the root's unit; on torchtitan 0.3 the
    # chunked loss's backwards reach the weight before that unit's backward begins, and their
    # gradient must join the row, not be replaced by it.
    assert_close(curve(four["qwen3_nnn"]), losses, rtol=1e-5)


def test_auto_strategy_plans_logs_the_ranking_and_trains_the_choice(four: dict[str, Any]) -> None:
    auto, rank0 = four["auto"], four["auto"]["logs"][0]
    chosen = [m for m in rank0 if m.startswith("PaRO auto: chose ") and m.endswith("that fits in memory")]
    assert len(chosen) == 1, rank0
    code = chosen[0].split()[3].rstrip(",")
    table = next(m for m in rank0 if m.startswith("PaRO auto: strategies ranked")).splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("rank  strategy"))
    assert any(line.startswith("# model: Psi = ") for line in table[:header])
    rows = [line.split() for line in table[header + 1:]]
    assert len(rows) == 14 and rows[0][:2] == ["1", code], table
    comm = chosen[0].split(" with ")[1].split(" collectives")[0]  # "default" or "ho_ring at depth C"
    assert comm == "default" or comm.startswith("ho_ring at depth "), chosen
    assert rows[0][12] == ("default" if comm == "default" else f"ho_ring/{comm.split()[-1]}"), rows[0]
    applied = comm if comm == "default" else f"ho_ring, at most {comm.split()[-1]} chunks"
    for rank_logs in auto["logs"]:  # every rank wraps the model with rank 0's choice
        assert (f"Applied PaRO {code} (chosen by paro_strategy='auto') ({applied} (chosen by the planner)) on "
                "2 group(s) x 2 rank(s) to the model") in rank_logs, rank_logs
    assert auto["calibration_written"]
    # NIG with paro_comm = "auto": its five candidate collectives ranked, the fastest applied.
    nig = next(m for m in rank0 if m.startswith("PaRO auto: NIG's collectives ranked")).splitlines()
    candidates = [line.split() for line in nig[next(i for i, line in enumerate(nig) if line.startswith("rank")) + 1:]]
    assert sorted(row[12] for row in candidates) == ["default", "ho_ring/16", "ho_ring/2", "ho_ring/4", "ho_ring/8"]
    nig_chosen = next(m for m in rank0 if m.startswith("PaRO auto: chose NIG with "))
    assert "(chosen by the planner)) on 2 group(s) x 2 rank(s)" in next(
        m for m in auto["logs"][0] if m.startswith("Applied PaRO NIG")), nig_chosen
    # Whatever it chose, it starts from stock HSDP's weights (torchtitan_patch.init) on the same
    # data, so step 1 agrees; then it must train.
    losses = curve(auto["losses"])
    assert losses[0] == pytest.approx(curve(four["stock"])[0], rel=LOSS_RTOL)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses) and losses[1] < losses[0] - 0.5, losses


def test_tensor_parallel_composes_with_paro(eight: dict[str, Any]) -> None:
    assert len(eight["tp_iig"]) == PARITY_STEPS
    assert_close(curve(eight["tp_iig"]), curve(eight["tp_stock"]), rtol=1e-5)


def test_pipeline_parallel_composes_with_paro(eight: dict[str, Any]) -> None:
    assert len(eight["pp_iig"]) == PARITY_STEPS
    assert_close(curve(eight["pp_iig"]), curve(eight["pp_stock"]), rtol=1e-5)


@pytest.mark.parametrize("name", ["tp", "pp"])
def test_bf16_with_activation_checkpointing_composes_with_tp_and_pp_and_replays(eight: dict[str, Any],
                                                                                name: str) -> None:
    got = eight[f"{name}_bf16_ac"]
    assert len(got["losses"]) == 2 and got["losses"][1] < got["losses"][0], got
    assert got["replayed"] == pytest.approx(got["losses"][1:], rel=1e-6, abs=0), got


if __name__ == "__main__":
    rank_main(_scenarios_4 if sys.argv[3] == "4" else _scenarios_8, Path(sys.argv[1]), Path(sys.argv[2]))
