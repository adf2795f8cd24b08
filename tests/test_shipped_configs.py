"""Every file in ``train_configs/`` run as a user runs it, shrunk only in size.

For each TOML: ``torchrun -m torchtitan_patch.train --job.config_file <file>`` (torchtitan's own
trainer; on a machine without an accelerator in CPU mode) with the file's own settings kept:
strategy, collectives, mixed precision, activation checkpointing, compile, checkpointing,
metrics, gradient accumulation, TP / PP where set. The overrides only shrink it: the model's
debug flavor, the shipped tokenizer and corpus, one 64-token sequence per micro-batch, 2 groups
x 2 ranks (TP and PP degrees capped at 2), 3 steps with a 1-step warm-up, a checkpoint every 2
steps (switched on, full, where the file leaves checkpointing off). The job must train with
falling loss and save complete checkpoints; the same command started over a copy of its step-2
checkpoint must resume and log the same step-3 loss.

A setting that cannot run on CPU is turned off by name in :data:`CPU_UNSUPPORTED`, and the test
warns which, for which file. The README's ``paro plan --config`` command must read every file too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path
from typing import Any

import pytest

from paro_fsdp.strategy import ParoStrategy

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "train_configs").glob("*.toml"))
ASSETS = REPO / "torchtitan_patch" / "assets"
STEPS = 3
# (section, field): (the override that turns it off, why CPU cannot run it). Only settings that
# are off when falsy and that a command-line flag can switch off: torchtitan 0.2.2 cannot clear
# model.converters from the command line ("" parses as [""]), so a file with float8 converters
# would fail here by name rather than run without them.
CPU_UNSUPPORTED: dict[tuple[str, str], tuple[list[str], str]] = {
    ("parallelism", "enable_async_tensor_parallel"): (["--parallelism.no-enable-async-tensor-parallel"],
                                                      "async TP needs CUDA symmetric memory"),
}
_LOSS = re.compile(r"step:\s*(\d+)\s.*?loss:\s*(-?[\d.]+)")


def _overrides(config: dict[str, Any], dump: Path) -> tuple[list[str], int, list[str]]:
    """The size overrides for ``config``, the world size they need and the settings turned off."""
    training, par = config.get("training", {}), config.get("parallelism", {})
    ranks_before = max(1, par.get("data_parallel_replicate_degree", 1)) * max(1, par.get("data_parallel_shard_degree", 1))
    accum = max(1, training.get("global_batch_size", 0) // (training.get("local_batch_size", 1) * ranks_before))
    tp, pp = min(par.get("tensor_parallel_degree", 1), 2), min(par.get("pipeline_parallel_degree", 1), 2)
    out = [
        "--job.dump_folder", str(dump),
        "--model.flavor", "debugmodel",
        "--model.hf_assets_path", str(ASSETS / "tokenizer"),
        "--training.seq_len", "64",
        "--training.local_batch_size", "1",
        "--training.global_batch_size", str(accum * 4),  # the file's micro-batches per step, on 2 x 2
        "--training.steps", str(STEPS),
        "--lr_scheduler.warmup_steps", "1",
        "--parallelism.data_parallel_replicate_degree", "2",
        "--parallelism.data_parallel_shard_degree", "2",
        "--parallelism.tensor_parallel_degree", str(tp),
        "--parallelism.pipeline_parallel_degree", str(pp),
        "--checkpoint.interval", "2",
        "--metrics.log_freq", "1",
    ]
    if training.get("dataset", "local_text") == "local_text":
        out += ["--training.dataset_path", str(ASSETS / "corpus")]
    off = []
    for (section, field), (override, why) in CPU_UNSUPPORTED.items():
        if config.get(section, {}).get(field):
            out += override
            off.append(f"{section}.{field} ({why})")
    return out, 4 * tp * pp, off


def _train(config: Path, overrides: list[str], world: int) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
           "--local-ranks-filter", str(world - 1), "--tee", "3",  # the last PP stage logs the loss
           "-m", "torchtitan_patch.train", "--job.config_file", str(config), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"{config.name}: torchrun exited {proc.returncode}:\n{output[-8000:]}")
    return output


def _losses(output: str) -> dict[int, str]:
    """Logged loss per step, as printed (the same digits mean the same loss)."""
    return {int(step): loss for step, loss in _LOSS.findall(output)}


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_shipped_config_trains_saves_and_resumes(config: Path, tmp_path: Path) -> None:
    settings = tomllib.loads(config.read_text())
    folder = settings.get("checkpoint", {}).get("folder", "checkpoint")
    overrides, world, off = _overrides(settings, tmp_path / "run")
    if not settings.get("checkpoint", {}).get("enable"):  # the file trains without; save and resume anyway
        overrides += ["--checkpoint.enable", "--checkpoint.no-last-save-model-only"]
    for setting in off:
        warnings.warn(f"{config.name}: {setting} cannot run on CPU; this test turns it off", stacklevel=1)

    output = _train(config, overrides, world)
    losses = _losses(output)
    assert sorted(losses) == list(range(1, STEPS + 1)), output[-4000:]
    values = [float(losses[s]) for s in sorted(losses)]
    # The files' learning rates are set for long runs: a falling trend, not a fall at every step.
    assert values[-1] < values[0], f"{config.name}: loss does not fall: {values}"
    strategy = settings.get("parallelism", {}).get("paro_strategy")
    if strategy:
        assert f"Applied PaRO {strategy.upper()}" in output, output[-4000:]
        assert "paro comm/step" in output, output[-4000:]
    for step in (2, 3):
        saved = tmp_path / "run" / folder / f"step-{step}"
        assert (saved / ".metadata").is_file() and (saved / "paro_manifest.json").is_file(), saved

    # The same command over a copy of the step-2 checkpoint resumes from it.
    resumed_dump = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run" / folder / "step-2", resumed_dump / folder / "step-2")
    planned = tmp_path / "run" / "paro_calibration.json"  # the links paro_comm / paro_strategy = "auto" probed
    same_choice = ["--parallelism.paro_calibration", str(planned)] if planned.is_file() else []
    resumed = _losses(_train(config, [*overrides, "--job.dump_folder", str(resumed_dump), *same_choice], world))
    assert resumed == {3: losses[3]}, f"{config.name}: resumed {resumed}, uninterrupted {losses}"


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_paro_plan_reads_the_shipped_config(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from paro_fsdp.__main__ import main

    settings = tomllib.loads(config.read_text())
    assert main(["plan", "--config", str(config), "--intra-bw", "150", "--inter-bw", "3", "--memory", "80",
                 "--device-tflops", "400"]) == 0
    out = capsys.readouterr().out
    assert f"# torchtitan: {settings['model']['name']} {settings['model']['flavor']} ({config})" in out, out[:2000]
    rows = [line.split() for line in out.splitlines() if line and not line.startswith(("#", "rank", "best"))]
    assert sorted(r[1] for r in rows) == sorted(str(s) for s in ParoStrategy.all_valid()), out
    assert out.splitlines()[-1].startswith("best that fits: "), out[-500:]


@pytest.mark.parametrize(("section", "field"), list(CPU_UNSUPPORTED))
def test_each_cpu_override_switches_its_setting_off(section: str, field: str) -> None:
    from torchtitan.config import ConfigManager

    override, _ = CPU_UNSUPPORTED[(section, field)]
    on = ["--job.config_file", str(REPO / "train_configs" / "llama3_debug_paro.toml"), f"--{section}.{field}"]
    assert getattr(getattr(ConfigManager().parse_args(on), section), field)
    assert not getattr(getattr(ConfigManager().parse_args([*on, *override]), section), field)
