"""Initial weights do not depend on the parallel layout: one torchrun of 4 CPU ranks.

Inside it, torchtitan trainers for several layouts are built one after another on the same
process group (llama3 debug model, seed 42), each trains one step, and the last rank writes
what it measured to a JSON file the tests read:

- data parallel degree 4: stock FSDP 1x4, stock HSDP 2x2, stock DDP 4, PaRO IIG / NIG / GGG 2x2;
- data parallel degree 2: TP=2 and PP=2, each with stock FSDP 1x2 and PaRO IIG 2x1.

For each, every parameter is gathered to a full tensor right after the trainer is built and
compared with the unsharded model initialized in one process (``torch.manual_seed`` and the
model's ``init_weights`` on CPU); step-1 losses are compared between layouts that read the same
data (torchtitan gives each data-parallel rank a contiguous slice of the corpus, so the two
data-parallel degrees see different tokens).

``torchrun --nproc-per-node 4 tests/test_initial_weights.py DIR OUT --debug.no-layout-independent-init``
measures the same with torchtitan's own init instead. Two in-process tests check the hook on
an unsharded part, its opt-out and its fallback when the unsharded model does not fit in memory.
"""

from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "train_configs" / "llama3_debug_paro.toml"
SEED = 42
TP = ("--parallelism.tensor_parallel_degree", "2")
PP = ("--parallelism.pipeline_parallel_degree", "2", "--parallelism.pipeline_parallel_microbatch_size", "1")
# name: (dp_replicate, dp_shard, PaRO strategy or None for stock torchtitan, extra arguments)
LAYOUTS: dict[str, tuple[int, int, str | None, tuple[str, ...]]] = {
    "fsdp_1x4": (1, 4, None, ()),
    "hsdp_2x2": (2, 2, None, ()),
    "ddp_4": (4, 1, None, ()),
    "paro_iig_2x2": (2, 2, "IIG", ()),
    "paro_nig_2x2": (2, 2, "NIG", ()),
    "paro_ggg_2x2": (2, 2, "GGG", ()),
    "tp2_fsdp_1x2": (1, 2, None, TP),
    "tp2_paro_iig_2x1": (2, 1, "IIG", TP),
    "pp2_fsdp_1x2": (1, 2, None, PP),
    "pp2_paro_iig_2x1": (2, 1, "IIG", PP),
}
LOSS_RTOL = 1e-4  # same weights and data; TP splits matmuls and PP micro-batches, which reorders sums


# ----------------------------------------------------------------------------- rank side


def _args(dump: Path, layout: str, extra: list[str]) -> list[str]:
    g, m, strategy, more = LAYOUTS[layout]
    local = 1 if g * m == 4 else 2  # 2 micro-batches per step, 8 samples, for both DP degrees
    return [
        "--job.config_file", str(CONFIG),
        "--job.dump_folder", str(dump / layout),
        "--training.steps", "1",
        "--training.seq_len", "64",
        "--training.local_batch_size", str(local),
        "--training.global_batch_size", "8",
        "--lr_scheduler.warmup_steps", "1",
        "--metrics.no-enable-tensorboard",
        "--activation_checkpoint.mode", "none",
        "--debug.seed", str(SEED),
        "--parallelism.data_parallel_replicate_degree", str(g),
        "--parallelism.data_parallel_shard_degree", str(m),
        "--parallelism.paro_strategy", strategy or "None",
        *more,
        *extra,
    ]


def _reference(trainer: Any) -> dict[str, Any]:
    """The unsharded model initialized on CPU in this process, as a single-process run would."""
    import torch
    from torchtitan.protocols.train_spec import get_train_spec

    with torch.device("meta"):
        model = get_train_spec("llama3").model_cls(trainer.model_args)
    model.to_empty(device="cpu")
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(SEED)
        model.init_weights()
    return {k: v.detach() for k, v in model.named_parameters()}


def _compare(trainer: Any, reference: dict[str, Any]) -> tuple[float, list[str]]:
    """Largest difference between this rank's parameters (gathered) and the reference, and their names."""
    from torch.distributed.tensor import DTensor

    worst, names = 0.0, []
    for part in trainer.model_parts:
        for name, param in part.named_parameters():
            name = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
            full = param.full_tensor() if isinstance(param, DTensor) else param
            ref = reference[name]
            diff = math.inf if full.shape != ref.shape else (full.detach().cpu().double() - ref.double()).abs().max().item()
            worst, names = max(worst, diff), [*names, name]
    return worst, names


def _run(dump: Path, layout: str, extra: list[str], reference: dict[str, Any] | None) -> dict[str, Any]:
    import torch.distributed as dist
    from torchtitan.config import ConfigManager
    from torchtitan.train import Trainer

    trainer = Trainer(ConfigManager().parse_args(_args(dump, layout, extra)))
    reference = reference or _reference(trainer)
    diff, names = _compare(trainer, reference)
    losses: dict[int, float] = {}
    log = trainer.metrics_processor.log

    def record(step: int, loss: float, *rest: Any, **kw: Any) -> None:
        losses[step] = float(loss)
        log(step, loss, *rest, **kw)

    trainer.metrics_processor.log = record
    data = trainer.batch_generator(trainer.dataloader)
    trainer.step = 1
    trainer.train_step(data)
    trainer.close()
    del trainer
    gc.collect()
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (diff, names))
    covered = set().union(*(n for _, n in everyone))
    return {
        "max_diff": max(d for d, _ in everyone),
        "missing": sorted(set(reference) - covered),
        "loss": losses.get(1),
        "reference": reference,
    }


def _rank_main(root: Path, result: Path, extra: list[str]) -> None:
    import torch.distributed as dist
    from torchtitan.tools.logging import init_logger

    from torchtitan_patch.cpu import accelerator_available, enable_cpu_mode

    if not accelerator_available():
        enable_cpu_mode()
    init_logger()
    out, reference = {}, None
    for layout in LAYOUTS:
        out[layout] = _run(root, layout, extra, reference)
        reference = out[layout].pop("reference")
    if dist.get_rank() == dist.get_world_size() - 1:  # in the last PP stage, where the loss is
        result.write_text(json.dumps(out, indent=1))
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- test side


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("init")
    result = tmp / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--standalone",
           __file__, str(tmp), str(result)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0 or not result.exists():
        pytest.fail(f"torchrun exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return json.loads(result.read_text())


def test_every_layout_starts_from_the_unsharded_models_weights(layouts: dict[str, Any]) -> None:
    for name, run in layouts.items():
        assert run["missing"] == [], (name, run["missing"])
        assert run["max_diff"] == 0.0, (name, run["max_diff"])


def test_step_one_losses_agree_between_layouts_on_the_same_data(layouts: dict[str, Any]) -> None:
    for group in ([k for k, v in LAYOUTS.items() if v[0] * v[1] == 4],
                  [k for k, v in LAYOUTS.items() if v[0] * v[1] == 2]):
        losses = {k: layouts[k]["loss"] for k in group}
        first = losses[group[0]]
        assert all(math.isfinite(x) and math.isclose(x, first, rel_tol=LOSS_RTOL) for x in losses.values()), losses


# ----------------------------------------------------------------------------- in process, no process group


def _job(seed: int | None = 7, enabled: bool = True) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(debug=SimpleNamespace(seed=seed, layout_independent_init=enabled),
                           training=SimpleNamespace(dtype="float32"))


def _debug_model() -> Any:
    import torch
    from torchtitan.protocols.train_spec import get_train_spec

    spec = get_train_spec("llama3")
    with torch.device("meta"):
        return spec.model_cls(spec.model_args["debugmodel"])


def test_hook_gives_an_unsharded_part_the_seeded_values() -> None:
    import torch

    from torchtitan_patch.init import FullTensorInit, full_tensor_init

    part = full_tensor_init(lambda model, dims, job: model)(_debug_model(), None, _job())
    assert isinstance(part.init_weights, FullTensorInit)
    part.to_empty(device="cpu")
    torch.manual_seed(123)  # whatever the process's generator holds, the seed decides
    with torch.no_grad():  # as torchtitan's trainer calls it
        part.init_weights()
    reference = _debug_model()
    reference.to_empty(device="cpu")
    torch.manual_seed(7)
    with torch.no_grad():
        reference.init_weights()
    for (name, a), (_, b) in zip(part.named_parameters(), reference.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_hook_keeps_torchtitans_init_when_off_or_when_the_model_does_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchtitan_patch.init as init

    identity = init.full_tensor_init(lambda model, dims, job: model)
    assert not isinstance(identity(_debug_model(), None, _job(enabled=False)).init_weights, init.FullTensorInit)
    monkeypatch.setattr(init, "_host_memory_per_rank", lambda: 1 << 20)  # 1 MiB: the 25 MB model does not fit
    assert not isinstance(identity(_debug_model(), None, _job()).init_weights, init.FullTensorInit)


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
