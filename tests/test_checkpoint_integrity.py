"""Checkpoint integrity, in one process: torchtitan's CheckpointManager with torchtitan_patch's checks.

A tiny model, torchtitan's optimizer and LR-scheduler containers and a stand-in dataloader are
saved and loaded through ``CheckpointManager`` (DCP without a process group), then the
checkpoint is damaged or loaded into something it does not fit.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.config import ConfigManager

import torchtitan_patch  # noqa: F401  (installs the checks)
from torchtitan_patch.checkpoint import (
    MANIFEST,
    CheckpointIntegrityError,
    CheckpointMismatchError,
    complete_steps,
)


class Data:
    """Stateful like torchtitan's dataloader: one key per data-parallel rank and the degree."""

    def __init__(self, dp_world_size: int = 1, position: int = 0) -> None:
        self.dp_world_size, self.position = dp_world_size, position

    def state_dict(self) -> dict[str, Any]:
        return {"dp_rank_0": self.position, "world_size": self.dp_world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["dp_rank_0"]


class Train:
    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]


def _model(layers: int = 2, width: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def _manager(folder: Path, model: nn.Module, *extra: str, data: Data | None = None) -> tuple[CheckpointManager, Train]:
    config = ConfigManager().parse_args(
        ["--checkpoint.enable", "--checkpoint.folder", str(folder), "--checkpoint.interval", "1",
         "--checkpoint.no-last-save-model-only", "--checkpoint.keep_latest_k", "0",
         "--job.custom_config_module", "torchtitan_patch.job_config", *extra]
    )
    optimizers = OptimizersContainer([model], torch.optim.AdamW, {"lr": 1e-2})
    train = Train()
    manager = CheckpointManager(
        dataloader=data or Data(), model_parts=[model], optimizers=optimizers,
        lr_schedulers=build_lr_schedulers(optimizers, config.lr_scheduler, 10),
        states={"train_state": train}, checkpoint_config=config.checkpoint, sd_adapter=None,
    )
    return manager, train


def _train_and_save(folder: Path, steps: list[int], model: nn.Module | None = None, *extra: str) -> nn.Module:
    model = model or _model()
    manager, train = _manager(folder, model, *extra)
    for step in steps:
        model(torch.ones(2, 16)).sum().backward()
        manager.states["optimizer"].step()
        manager.states["optimizer"].zero_grad()
        train.step = step
        manager.save(step)
    manager.close()
    return model


def _load(folder: Path, model: nn.Module | None = None, *extra: str, data: Data | None = None,
          step: int = -1) -> tuple[bool, int]:
    manager, train = _manager(folder, model or _model(), *extra, data=data)
    try:
        return manager.load(step), train.step
    finally:
        manager.close()


def _shard(checkpoint: Path) -> Path:
    return next(checkpoint.glob("__0_*.distcp"))


def test_a_save_writes_a_manifest_and_an_intact_checkpoint_loads(tmp_path: Path) -> None:
    saved = _train_and_save(tmp_path / "ckpt", [1, 2])
    assert (tmp_path / "ckpt" / "step-2" / MANIFEST).is_file()
    model = _model()
    assert _load(tmp_path / "ckpt", model) == (True, 2)
    for a, b in zip(saved.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_an_interrupted_save_is_never_the_latest(tmp_path: Path) -> None:
    _train_and_save(tmp_path / "ckpt", [1, 2])
    # A save of step 3 that died while writing: shard files but no .metadata.
    shutil.copytree(tmp_path / "ckpt" / "step-2", tmp_path / "ckpt" / "step-3")
    (tmp_path / "ckpt" / "step-3" / ".metadata").unlink()
    (tmp_path / "ckpt" / "step-3" / MANIFEST).unlink()
    assert complete_steps(tmp_path / "ckpt") == [1, 2]
    assert _load(tmp_path / "ckpt") == (True, 2)
    with pytest.raises(CheckpointIntegrityError, match=r"step-3 is incomplete: it has no \.metadata.*load_step N"):
        _load(tmp_path / "ckpt", step=3)


def test_an_interrupted_resave_of_a_complete_step_is_incomplete_not_mixed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _train_and_save(tmp_path / "ckpt", [1, 2])
    write_data = FileSystemWriter.write_data

    def dies_after_writing(self: Any, plan: Any, planner: Any) -> Any:
        write_data(self, plan, planner).wait()
        raise RuntimeError("killed while saving")

    monkeypatch.setattr(FileSystemWriter, "write_data", dies_after_writing)
    with pytest.raises(BaseException, match="killed while saving"):  # DCP wraps it in a CheckpointException
        _train_and_save(tmp_path / "ckpt", [2])  # resumed at step 1 (load_step), saving step 2 again
    monkeypatch.undo()
    # The old step-2 index went before the new files came: step 2 is incomplete, step 1 is the latest.
    assert complete_steps(tmp_path / "ckpt") == [1]
    assert _load(tmp_path / "ckpt") == (True, 1)


def test_a_truncated_file_is_named(tmp_path: Path) -> None:
    _train_and_save(tmp_path / "ckpt", [1], None, "--checkpoint.no-paro-checksums")  # sizes from the index alone
    assert not (tmp_path / "ckpt" / "step-1" / MANIFEST).exists()
    shard = _shard(tmp_path / "ckpt" / "step-1")
    os.truncate(shard, shard.stat().st_size // 2)
    with pytest.raises(CheckpointIntegrityError, match=rf"{re.escape(str(shard))} is truncated: \d+ bytes, its index needs at least \d+"):
        _load(tmp_path / "ckpt")


def test_a_corrupted_file_is_named(tmp_path: Path) -> None:
    _train_and_save(tmp_path / "ckpt", [1, 2])
    shard = _shard(tmp_path / "ckpt" / "step-2")
    with shard.open("r+b") as f:  # one flipped byte: DCP alone would load it silently
        f.seek(shard.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CheckpointIntegrityError, match=rf"{re.escape(str(shard))} is corrupted: CRC-32 .*load_step N \(complete checkpoints there: steps 1\)"):
        _load(tmp_path / "ckpt")


def test_a_damaged_index_is_named(tmp_path: Path) -> None:
    _train_and_save(tmp_path / "ckpt", [1])
    index = tmp_path / "ckpt" / "step-1" / ".metadata"
    os.truncate(index, 16)
    with pytest.raises(CheckpointIntegrityError, match=rf"its index {re.escape(str(index))} cannot be read"):
        _load(tmp_path / "ckpt")


def test_a_checkpoint_of_another_model_says_so(tmp_path: Path) -> None:
    _train_and_save(tmp_path / "ckpt", [1], _model(layers=2))
    with pytest.raises(CheckpointMismatchError, match=r"another model: it has 2 parameters the model lacks \(0\.bias"):
        _load(tmp_path / "ckpt", nn.Sequential(nn.Identity(), nn.Linear(16, 16)))  # shallower: would load silently
    with pytest.raises(CheckpointMismatchError, match=r"another model: 2 of the model's 6 parameters are not in it"):
        _load(tmp_path / "ckpt", _model(layers=3))
    with pytest.raises(CheckpointMismatchError, match=r"4 have other shapes \(0\.bias: checkpoint \[16\], model \[8\].*model.flavor"):
        _load(tmp_path / "ckpt", _model(width=8))


def test_a_model_only_checkpoint_resumed_as_a_full_one_says_what_to_do(tmp_path: Path) -> None:
    model = _model()
    manager, _ = _manager(tmp_path / "ckpt", model, "--checkpoint.last-save-model-only")
    manager.save(5, last_step=True)
    manager.close()
    with pytest.raises(CheckpointMismatchError, match=r"holds the model only.*--checkpoint.initial_load_model_only"):
        _load(tmp_path / "ckpt")


def test_dataloader_state_of_another_dp_degree_says_what_to_do(tmp_path: Path) -> None:
    _train_and_save(tmp_path / "ckpt", [1])
    with pytest.raises(CheckpointMismatchError, match=r"data-parallel degree 1, this run has 4.*exclude_from_loading dataloader"):
        _load(tmp_path / "ckpt", data=Data(dp_world_size=4))
    assert _load(tmp_path / "ckpt", None, "--checkpoint.exclude_from_loading", "dataloader", data=Data(4)) == (True, 1)


def test_parameter_updates_in_flight_finish_before_a_save_or_load(tmp_path: Path) -> None:
    # torchtitan hands DCP the state dict it cached when the checkpointer was built, so
    # PaRO's state_dict pre-hooks, which finish an in-flight sync_p, do not run on a save.
    calls: list[str] = []

    class InFlight(nn.Sequential):
        def wait_parameters(self) -> None:
            calls.append("wait")

    torch.manual_seed(0)
    model = InFlight(nn.Linear(16, 16), nn.Linear(16, 16))
    manager, _ = _manager(tmp_path / "ckpt", model)
    manager.save(1)
    assert calls == ["wait"]
    assert manager.load() and calls == ["wait", "wait"]
    manager.close()
