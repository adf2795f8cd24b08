"""torchtitan integration pieces that need no process group: config fields, data, sync driver."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

from torchtitan.config import ConfigManager

from paro_fsdp.planner import Calibration, Cluster, LinkFit, plan as plan_all
from paro_fsdp.strategy import ParoStrategy
from torchtitan_patch.auto import device_memory_bytes, plan, plan_inputs
from torchtitan_patch.cpu import CpuDeviceModule
from torchtitan_patch.data import load_local_text
from torchtitan_patch.v0_2.data import ReshardGuardDataLoader
from torchtitan_patch.models import GradientSyncDriver
from torchtitan_patch.settings import ParoConfigError, paro_settings

CONFIG = Path(__file__).resolve().parents[1] / "train_configs" / "llama3_debug_paro.toml"


def _config(*overrides: str) -> Any:
    return ConfigManager().parse_args(["--job.config_file", str(CONFIG), *overrides])


def test_debug_config_parses_to_iig_with_the_planners_collectives() -> None:
    settings = paro_settings(_config(), world_size=4)
    assert settings is not None
    assert (settings.strategy.code, settings.comm, settings.groups, settings.group_size) == ("IIG", "auto", 2, 2)
    assert settings.plans_collectives and settings.describe() == (
        "PaRO IIG (collectives chosen by the planner: default or ho_ring at depth 2/4/8/16) on 2 group(s) x 2 rank(s)")
    chosen = settings.with_choice(settings.strategy, None, "ho_ring", 4)
    assert not chosen.plans_collectives and chosen.describe() == (
        "PaRO IIG (ho_ring, at most 4 chunks (chosen by the planner)) on 2 group(s) x 2 rank(s)")
    one_link = paro_settings(_config("--parallelism.data_parallel_replicate_degree", "1",
                                     "--parallelism.data_parallel_shard_degree", "4"), 4)
    assert (one_link.comm, one_link.plans_collectives) == ("default", False)  # one link: nothing to overlap


def test_ho_ring_chunks_reach_the_settings() -> None:
    ho_ring = paro_settings(_config("--parallelism.paro_comm", "ho_ring"), 4)
    assert ho_ring.ho_ring_chunks is None and not ho_ring.plans_collectives  # 0: HO-Ring's default
    settings = paro_settings(_config("--parallelism.paro_comm", "ho_ring", "--parallelism.paro_ho_ring_chunks", "4"), 4)
    assert settings.ho_ring_chunks == 4
    assert "PaRO IIG (ho_ring, at most 4 chunks) on 2 group(s) x 2 rank(s)" == settings.describe()


def test_quantization_fields_reach_the_settings() -> None:
    assert paro_settings(_config(), 4).quant is None  # default: everything exact
    settings = paro_settings(_config("--parallelism.paro_quant_params", "int8", "--parallelism.paro_quant_grads",
                                     "int4", "--parallelism.paro_quant_block_size", "128"), 4)
    assert (settings.quant.params, settings.quant.grads, settings.quant.block_size) == ("int8", "int4", 128)
    assert settings.describe() == ("PaRO IIG (collectives chosen by the planner: default or ho_ring at depth 2/4/8/16; "
                                   "across groups params int8 and grads int4 in blocks of 128) on 2 group(s) x 2 rank(s)")
    grads_only = paro_settings(_config("--parallelism.paro_quant_grads", "int8"), 4).quant
    assert (grads_only.params, grads_only.grads, grads_only.block_size) == (None, "int8", 256)
    feedback = paro_settings(_config("--parallelism.paro_quant_grads", "int4", "--parallelism.paro_quant_error_feedback"), 4)
    assert feedback.quant.error_feedback and feedback.describe().endswith("grads int4 in blocks of 256 with error "
                                                                          "feedback) on 2 group(s) x 2 rank(s)")


def test_bucket_cap_reaches_the_settings() -> None:
    assert paro_settings(_config(), 4).bucket_cap_mb is None  # by strategy
    settings = paro_settings(_config("--parallelism.paro_strategy", "NNG", "--parallelism.paro_bucket_cap_mb", "25"), 4)
    assert settings.bucket_cap_mb == 25.0
    assert settings.describe().endswith("; P = N blocks in units of 25 MiB) on 2 group(s) x 2 rank(s)")
    per_block = paro_settings(_config("--parallelism.paro_strategy", "NNN", "--parallelism.paro_bucket_cap_mb", "0"), 4)
    assert per_block.bucket_cap_mb == 0.0 and "; P = N blocks in a unit each)" in per_block.describe()
    gathered = paro_settings(_config("--parallelism.paro_bucket_cap_mb", "0"), 4)  # IIG: P is gathered per block
    assert gathered.bucket_cap_mb == 0.0 and "P = N" not in gathered.describe()


def test_command_line_overrides_the_toml_strategy_and_aliases_parse() -> None:
    assert paro_settings(_config("--parallelism.paro_strategy", "NIG"), 4).strategy.code == "NIG"
    assert paro_settings(_config("--parallelism.paro_strategy", "zero3"), 4).strategy.code == "GGG"


def test_unset_strategy_means_stock_torchtitan() -> None:
    assert paro_settings(_config("--parallelism.paro_strategy", "None"), 4) is None


@pytest.mark.parametrize(
    ("overrides", "world", "expected"),
    [
        (("--parallelism.paro_strategy", "GIN"), 4, r"paro_strategy='GIN' is invalid.*not effective"),
        (("--parallelism.paro_strategy", "XYZ"), 4, r"paro_strategy='XYZ' is invalid.*Valid codes"),
        (("--parallelism.paro_comm", "ring"), 4,
         r"paro_comm='ring' is invalid; valid values: default, ho_ring, auto"),
        (("--parallelism.paro_ho_ring_chunks", "-1"), 4,
         r"paro_ho_ring_chunks=-1 is invalid: HO-Ring's pipeline depth is a positive int, or 0 for its default "
         r"\(16; with paro_comm = 'auto', the planner's choice\)"),
        (("--parallelism.paro_comm", "default", "--parallelism.paro_ho_ring_chunks", "4"), 4,
         r"paro_ho_ring_chunks=4 is HO-Ring's pipeline depth, valid only with parallelism.paro_comm='ho_ring', "
         r"but parallelism.paro_comm='default': set "
         r"parallelism.paro_comm='ho_ring', or leave parallelism.paro_ho_ring_chunks unset \(0\)"),
        (("--parallelism.paro_comm", "auto", "--parallelism.paro_ho_ring_chunks", "4"), 4,
         r"paro_ho_ring_chunks=4 is invalid with parallelism.paro_comm='auto' \(the planner chooses the depth\): leave "
         r"parallelism.paro_ho_ring_chunks unset, or set parallelism.paro_comm='ho_ring' to fix it"),
        (("--parallelism.paro_bucket_cap_mb", "-1"), 4,
         r"parallelism.paro_bucket_cap_mb=-1.0 is invalid: MiB of parameters per unit where P = N, a number >= 0 "
         r"\(0: a unit per transformer block\), or unset \(25 for NNN, a unit per block otherwise\)"),
        (("--parallelism.paro_bucket_cap_mb", "inf"), 4, r"parallelism.paro_bucket_cap_mb=inf is invalid"),
        (("--parallelism.paro_quant_params", "int4"), 4,
         r"parallelism.paro_quant_params='int4' is invalid; valid values: int8, or None \(exact\) \(empty\)"),
        (("--parallelism.paro_quant_grads", "fp8"), 4,
         r"parallelism.paro_quant_grads='fp8' is invalid; valid values: int8, int4"),
        (("--parallelism.paro_quant_params", "int8", "--parallelism.paro_quant_error_feedback"), 4,
         r"parallelism.paro_quant_error_feedback=True corrects quantized gradients, but parallelism.paro_quant_grads "
         r"is empty"),
        (("--parallelism.paro_quant_grads", "int8", "--parallelism.paro_quant_block_size", "7"), 4,
         r"parallelism.paro_quant_block_size=7 is invalid: elements per quantization scale, an even int"),
        ((), 8, r"replicate_degree \(2\) x data_parallel_shard_degree \(2\) .* = 4, but 8 ranks"),
        (("--parallelism.data_parallel_shard_degree", "-1"), 7, r"world size 7 is not divisible"),
        (("--parallelism.context_parallel_degree", "2"), 4, r"context_parallel_degree=2 is not supported"),
        (("--model.name", "deepseek_v3"), 4, r"model.name='deepseek_v3' is not supported.*llama3, qwen3"),
        (("--parallelism.data_parallel_replicate_degree", "0"), 4, r"data_parallel_replicate_degree=0 is invalid"),
        (("--parallelism.pipeline_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "1",
          "--parallelism.pipeline_parallel_schedule", "ZBVZeroBubble"), 4, r"schedule='ZBVZeroBubble' is not"),
    ],
)
def test_invalid_paro_settings_name_field_value_and_what_is_valid(
    overrides: tuple[str, ...], world: int, expected: str
) -> None:
    with pytest.raises(ParoConfigError, match=expected):
        paro_settings(_config(*overrides), world)


def test_shard_degree_minus_one_takes_the_leftover_ranks() -> None:
    settings = paro_settings(_config("--parallelism.data_parallel_shard_degree", "-1"), world_size=8)
    assert (settings.groups, settings.group_size) == (2, 4)


def test_auto_strategy_is_accepted_with_its_fields(tmp_path: Path) -> None:
    from paro_fsdp.planner import write_calibration

    cal = str(tmp_path / "cal.json")
    write_calibration(_calibration(2, 2, 1e9), cal)
    settings = paro_settings(
        _config("--parallelism.paro_strategy", "auto", "--parallelism.paro_calibration", cal,
                "--parallelism.paro_device_memory_gib", "12.5"), 4)
    assert settings is not None and settings.auto and settings.strategy is None
    assert (settings.calibration, settings.device_memory_gib, settings.comm) == (cal, 12.5, "auto")
    assert "PaRO auto (collectives chosen by the planner" in settings.describe()
    chosen = settings.with_choice(ParoStrategy.parse("NIG"), None, "default", None)
    assert "PaRO NIG (chosen by paro_strategy='auto') (default (chosen by the planner))" in chosen.describe()
    defaults = paro_settings(_config("--parallelism.paro_strategy", "AUTO"), 4)
    assert (defaults.calibration, defaults.device_memory_gib) == ("", 0.0)


@pytest.mark.parametrize(
    ("overrides", "world", "expected"),
    [
        (("--parallelism.paro_device_memory_gib", "-1"), 4, r"paro_device_memory_gib=-1.0 is invalid.*> 0, or 0"),
        (("--parallelism.paro_device_memory_gib", "inf"), 4, r"paro_device_memory_gib=inf is invalid"),
        (("--parallelism.data_parallel_replicate_degree", "1", "--parallelism.data_parallel_shard_degree", "1"), 1,
         r"'auto' needs at least 2 data-parallel ranks.*'NNN'"),
    ],
)
def test_invalid_auto_fields_name_field_value_and_what_is_valid(
    overrides: tuple[str, ...], world: int, expected: str
) -> None:
    with pytest.raises(ParoConfigError, match=expected):
        paro_settings(_config("--parallelism.paro_strategy", "auto", *overrides), world)


def _meta_debug_model() -> nn.Module:
    from torchtitan.protocols.train_spec import get_train_spec

    import torchtitan_patch  # noqa: F401  (registers the specs)

    spec = get_train_spec("llama3")
    with torch.device("meta"):
        return spec.model_cls(spec.model_args["debugmodel"])


def _calibration(nodes: int, ranks: int, inter_bw: float, quant_rate: float = 0.0) -> Calibration:
    return Calibration(nodes=nodes, ranks_per_node=ranks, intra=LinkFit(1e-5, 1e10), inter=LinkFit(1e-4, inter_bw),
                       quant_rate=quant_rate)


def test_auto_plans_the_real_model_and_picks_what_fits() -> None:
    job = _config("--parallelism.paro_strategy", "auto")
    settings, model = paro_settings(job, 4), _meta_debug_model()
    sizes, setup = plan_inputs(model, job, backwards_per_step=2)
    assert sizes.params == sum(p.numel() for p in model.parameters()) and sizes.blocks == len(model.layers)
    # The debug TOML trains in fp32 on the wire; AdamW keeps two fp32 moments.
    assert (sizes.wire_param_bytes, sizes.wire_grad_bytes, sizes.optim_bytes, setup.accum) == (4, 4, 8, 2)
    assert setup.activation_bytes > 0
    # Ample memory and a slow inter link: the model is replicated per group and only the
    # once-per-step syncs cross it, so the pick keeps P and G inside the group.
    best, lines = plan(model, settings, job, 2, _calibration(2, 2, 1e7), device_memory=2**34)
    assert best.strategy.param.name in "NI" and best.strategy.grad.name in "NI" and best.quant is None
    assert lines[0].startswith("# model: Psi = ") and any(line.split()[:2] == ["1", best.code] for line in lines)
    # A budget below full replication but above the smallest strategy's memory rules out P=N.
    cluster = Cluster(nodes=2, ranks_per_node=2, intra_bw=1e10, inter_bw=1e7, device_memory=2**34)
    smallest = min(e.total_memory for e in plan_all(sizes, cluster, setup))
    tight, _ = plan(model, settings, job, 2, _calibration(2, 2, 1e7), device_memory=smallest * 1.05)
    assert tight.strategy.param.name != "N"
    with pytest.raises(ParoConfigError, match=r"paro_strategy='auto': no PaRO strategy fits in"):
        plan(model, settings, job, 2, _calibration(2, 2, 1e7), device_memory=smallest * 0.5)
    with pytest.raises(ParoConfigError, match=r"measured on 2 group\(s\) x 4 rank\(s\).*mesh is 2 x 2"):
        plan(model, settings, job, 2, _calibration(2, 4, 1e7), device_memory=2**34)


def test_auto_prices_the_quantized_traffic_the_job_runs_with() -> None:
    job = _config("--parallelism.paro_strategy", "auto", "--parallelism.paro_quant_params", "int8",
                  "--parallelism.paro_quant_grads", "int8")
    settings, model = paro_settings(job, 4), _meta_debug_model()
    # A calibration without a measured quantize rate (an older file): rank 0 measures it itself.
    best, lines = plan(model, settings, job, 2, _calibration(2, 2, 1e7), device_memory=2**34)
    assert any(line.startswith("# quantized inter-group traffic (p8g8") for line in lines)
    table = [line.split() for line in lines if not line.startswith("#")][1:]
    assert len(table) == 14 and all(row[1].endswith("+p8g8") for row in table)  # what the job will run
    assert table[0][1] == f"{best.code}+p8g8" and best.quant == settings.quant


def test_auto_quantization_is_chosen_only_where_it_pays() -> None:
    job = _config("--parallelism.paro_strategy", "auto", "--parallelism.paro_quant_params", "auto",
                  "--parallelism.paro_quant_grads", "auto")
    settings, model = paro_settings(job, 4), _meta_debug_model()
    assert settings.quant_auto and (settings.quant.params, settings.quant.grads) == ("int8", "int8")
    assert settings.describe().endswith("params int8 and grads int8 in blocks of 256, or exact, as auto chooses) "
                                        "on 2 group(s) x 2 rank(s)")
    # A slow inter link and fast quantization: a quantized variant is fastest, and the trainer runs it.
    fast, lines = plan(model, settings, job, 2, _calibration(2, 2, 1e7, quant_rate=1e10), device_memory=2**34)
    assert fast.quant == settings.quant and len([line for line in lines if not line.startswith("#")]) == 29
    assert settings.with_choice(fast.strategy, fast.quant, fast.comm, fast.ho_ring_chunks).quant == settings.quant
    # Quantizing slower than the link it saves: exact wins, and the trainer runs exact traffic.
    slow, _ = plan(model, settings, job, 2, _calibration(2, 2, 1e10, quant_rate=1e3), device_memory=2**34)
    assert slow.quant is None and settings.with_choice(slow.strategy, slow.quant, slow.comm, slow.ho_ring_chunks).quant is None
    with pytest.raises(ParoConfigError, match=r"parallelism.paro_quant_grads='auto' lets parallelism.paro_strategy="
                                              r"'auto' choose whether to quantize, but the strategy is set"):
        paro_settings(_config("--parallelism.paro_quant_grads", "auto"), 4)


def test_auto_device_memory_is_the_field_or_the_host_share_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = paro_settings(_config("--parallelism.paro_strategy", "auto", "--parallelism.paro_device_memory_gib",
                                     "3"), 4)
    assert device_memory_bytes(settings, "cpu") == 3 * 2**30
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert device_memory_bytes(paro_settings(_config("--parallelism.paro_strategy", "auto"), 4), "cpu") == host / 4


def test_auto_chooses_once_per_trainer_and_every_pipeline_stage_reuses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchtitan.distributed import ParallelDims

    import torchtitan_patch.auto as hook

    calls: list[int] = []

    def choose(model: nn.Module, settings: Any, mesh: Any, job_config: Any, backwards: int) -> ParoStrategy:
        calls.append(backwards)
        return ParoStrategy.parse("NIG" if len(calls) == 1 else "IIG")

    monkeypatch.setattr(hook, "choose_auto_strategy", choose)
    job = _config("--parallelism.paro_strategy", "auto", "--training.local_batch_size", "2",
                  "--parallelism.pipeline_parallel_degree", "2", "--parallelism.pipeline_parallel_microbatch_size", "1")
    settings = paro_settings(job, 8)

    def dims() -> ParallelDims:
        return ParallelDims(dp_replicate=2, dp_shard=2, cp=1, tp=1, pp=2, ep=1, etp=1, world_size=8)

    trainer = dims()
    stages = [hook.auto_strategy(nn.Linear(2, 2), settings, None, trainer, job) for _ in range(2)]
    assert [s.code for s in stages] == ["NIG", "NIG"]
    # 16 global / (2 local x 4 DP ranks) = 2 micro-batches, each 2 pipeline micro-batches.
    assert calls == [4]
    assert hook.auto_strategy(nn.Linear(2, 2), settings, None, dims(), job).code == "IIG"  # another trainer
    assert len(calls) == 2


def test_local_text_reads_txt_jsonl_and_folders(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "third doc"}) + "\n")
    assert load_local_text(str(tmp_path / "a.txt"))["text"] == ["first doc", "second doc"]
    assert load_local_text(str(tmp_path))["text"] == ["first doc", "second doc", "third doc"]
    with pytest.raises(FileNotFoundError, match="dataset_path"):
        load_local_text(str(tmp_path / "missing"))
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_local_text(str(tmp_path / "bad.jsonl"))


class _FakeLoader:
    def __init__(self, world: int) -> None:
        self.dp_world_size = world
        self.loaded: dict[str, Any] | None = None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = state


def test_dataloader_state_refuses_another_dp_degree() -> None:
    inner = _FakeLoader(world=4)
    guard = ReshardGuardDataLoader(inner)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="data-parallel degree 2, this run has 4.*exclude_from_loading dataloader"):
        guard.load_state_dict({"dp_rank_0": b"", "world_size": 2})
    assert inner.loaded is None
    guard.load_state_dict({"dp_rank_0": b"", "world_size": 4})
    assert inner.loaded == {"dp_rank_0": b"", "world_size": 4}


class _Recorder(nn.Linear):
    def __init__(self) -> None:
        super().__init__(2, 2)
        self.calls: list[bool] = []

    def set_requires_gradient_sync(self, value: bool) -> None:
        self.calls.append(value)


def test_gradient_sync_is_requested_on_the_last_micro_batch_only() -> None:
    model = _Recorder()
    driver = GradientSyncDriver(model, backwards_per_step=3, pipeline=False)
    x = torch.zeros(1, 2)
    for _ in range(2):
        driver.reset()  # what the optimizer container's zero_grad does at each step
        for _ in range(3):
            model(x)
        with torch.no_grad():
            model(x)  # validation forwards are not micro-batches
    assert model.calls == [False, False, True] * 2


def test_pipeline_schedule_syncs_on_its_last_backward_of_the_step() -> None:
    model = _Recorder()
    driver = GradientSyncDriver(model, backwards_per_step=4, pipeline=True)
    for _ in range(2):  # 2 accumulation steps x 2 pipeline micro-batches, twice
        driver.reset()
        for _ in range(2):
            model.set_requires_gradient_sync(False)  # before each backward
            model.set_requires_gradient_sync(False)
            model.set_requires_gradient_sync(True)  # the schedule's reduce step
    assert model.calls == [False, False, False, True] * 2


@pytest.mark.parametrize("pipeline", [False, True])
def test_registered_models_are_freed_with_their_trainer(pipeline: bool) -> None:
    import gc
    import weakref

    from torchtitan_patch.models import PARO_MODELS

    model = _Recorder()
    PARO_MODELS[model] = GradientSyncDriver(model, backwards_per_step=2, pipeline=pipeline)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_cpu_device_module_answers_the_memory_monitor() -> None:
    stats = CpuDeviceModule.memory_stats()
    assert 0 < stats["active_bytes.all.peak"] <= stats["reserved_bytes.all.peak"] * 2
    assert CpuDeviceModule.get_device_properties().total_memory > stats["active_bytes.all.peak"]
    assert CpuDeviceModule().current_device() == 0
