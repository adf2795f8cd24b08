"""torchtitan + PaRO end to end on CPU: loss parity, resume, resharding, TP and PP composition.

Each launch is one ``torchrun`` of this file; inside it, torchtitan trainers for several
configurations run one after another on the same process group (tiny debug model, a few
steps), and the last rank writes what it measured to a JSON file the tests read:

- 4 ranks: stock HSDP vs PaRO IIG/HO-Ring on 2x2 (loss curves), an interrupted and resumed
  IIG run vs an uninterrupted one, and a checkpoint chain IIG 2x2 -> GGG 1x4 -> NIG 2x2
  (parameters and optimizer state after each load equal those saved; training continues on
  the uninterrupted run's losses); qwen3 with PaRO vs stock; ``paro_strategy = "auto"``
  (links probed at start-up, the ranking logged, the chosen strategy trained);
- 8 ranks: TP=2 and PP=2, each with PaRO IIG 2x2 vs torchtitan's stock HSDP 2x2.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "train_configs" / "llama3_debug_paro.toml"
LOSS_RTOL = 1e-4  # stock FSDP vs PaRO: same math, different reduction order


# ----------------------------------------------------------------------------- rank side


def _args(dump: Path, steps: int, dp: tuple[int, int], strategy: str | None, *extra: str) -> list[str]:
    g, m = dp
    return [
        "--job.config_file", str(CONFIG),
        "--job.dump_folder", str(dump),
        "--training.steps", str(steps),
        "--training.seq_len", "64",
        "--training.local_batch_size", "1",
        "--training.global_batch_size", str(2 * g * m),  # 2 micro-batches per step
        "--lr_scheduler.warmup_steps", "1",
        "--metrics.no-enable-tensorboard",
        "--activation_checkpoint.mode", "none",
        "--parallelism.data_parallel_replicate_degree", str(g),
        "--parallelism.data_parallel_shard_degree", str(m),
        "--parallelism.paro_strategy", strategy or "None",
        *extra,
    ]


def _full(value: Any) -> Any:
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        value = value.full_tensor()
    return value.detach().clone() if hasattr(value, "detach") else value


def _snapshot(trainer: Any) -> dict[str, Any]:
    """Every parameter and optimizer-state entry, gathered to full tensors."""
    state = {f"model.{k}": _full(v) for m in trainer.model_parts for k, v in m.state_dict().items()}
    state.update({f"optim.{k}": _full(v) for k, v in trainer.optimizers.state_dict().items()})
    return state


def _max_difference(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, str]:
    """Largest absolute difference between two snapshots, and where (inf if keys or shapes differ)."""
    import torch

    if a.keys() != b.keys():
        return math.inf, f"keys differ: {sorted(a.keys() ^ b.keys())[:4]}"
    worst, where = 0.0, ""
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            if not isinstance(y, torch.Tensor) or x.shape != y.shape:
                return math.inf, k
            diff = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
        else:
            diff = 0.0 if x == y else math.inf
        if diff > worst:
            worst, where = diff, k
    return worst, where


def _run(args: list[str], stop_after: int | None = None, snapshot_at: int | None = None,
         snapshot_loaded: bool = False) -> dict[str, Any]:
    """Train with torchtitan's trainer (after loading its checkpoint, if any).

    ``stop_after`` interrupts the run after that step and saves a checkpoint, as a job that
    is stopped and will be resumed. Snapshots are taken right after loading ("loaded", only
    when asked: reading a fresh optimizer's state initializes it), at step ``snapshot_at``
    ("at") and at the end ("end").
    """
    from torchtitan.config import ConfigManager
    from torchtitan.train import Trainer

    trainer = Trainer(ConfigManager().parse_args(args))
    out: dict[str, Any] = {"losses": {}}
    log = trainer.metrics_processor.log

    def record(step: int, loss: float, *rest: Any, **kw: Any) -> None:
        out["losses"][step] = float(loss)
        log(step, loss, *rest, **kw)

    trainer.metrics_processor.log = record
    backend_log = trainer.metrics_processor.logger.log  # what TensorBoard / W&B receive

    def record_scalars(metrics: dict[str, Any], step: int) -> None:
        out.setdefault("scalars", {})[step] = {k: v for k, v in metrics.items() if k.startswith("paro/")}
        backend_log(metrics, step)

    trainer.metrics_processor.logger.log = record_scalars
    trainer.checkpointer.load(step=trainer.job_config.checkpoint.load_step)
    if snapshot_loaded:
        out["loaded"] = _snapshot(trainer)
    data = trainer.batch_generator(trainer.dataloader)
    last = trainer.job_config.training.steps if stop_after is None else stop_after
    while trainer.step < last:
        trainer.step += 1
        trainer.train_step(data)
        trainer.checkpointer.save(trainer.step, last_step=trainer.step == last)
        if trainer.step == snapshot_at:
            out["at"] = _snapshot(trainer)
    out["end"] = _snapshot(trainer)
    trainer.close()
    del trainer
    gc.collect()
    return out


def _agree(difference: tuple[float, str]) -> tuple[float, str]:
    """The largest difference over ranks (each rank compares its own gathered state)."""
    import torch.distributed as dist

    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, difference)
    return max(everyone, key=lambda d: d[0])


def _scenarios_4(root: Path) -> dict[str, Any]:
    import shutil

    import torch.distributed as dist

    ckpt = ["--checkpoint.enable", "--checkpoint.interval", "2", "--checkpoint.no-last-save-model-only"]

    def load_from(path: Path) -> list[str]:
        return [*ckpt, "--checkpoint.initial_load_path", str(path), "--checkpoint.no-initial-load-model-only"]

    out: dict[str, Any] = {"stock": _run(_args(root / "stock", 4, (2, 2), None))["losses"]}
    iig = _run(_args(root / "iig", 4, (2, 2), "IIG", *ckpt), snapshot_at=2)
    out["iig"] = iig["losses"]
    # Resume: a fresh trainer picks up the step-2 checkpoint an interrupted job would have left.
    if dist.get_rank() == 0:
        shutil.copytree(root / "iig" / "checkpoint" / "step-2", root / "resumed" / "checkpoint" / "step-2")
    dist.barrier()
    out["resumed"] = _run(_args(root / "resumed", 4, (2, 2), "IIG", *ckpt))["losses"]
    # Reshard chain: IIG 2x2 (step 2) -> GGG 1x4 (loads it, trains step 3, stops) -> NIG 2x2 (step 4).
    ggg = _run(_args(root / "ggg", 4, (1, 4), "GGG", *load_from(root / "iig" / "checkpoint" / "step-2")),
               stop_after=3, snapshot_loaded=True)
    nig = _run(_args(root / "nig", 4, (2, 2), "NIG", *load_from(root / "ggg" / "checkpoint" / "step-3")),
               snapshot_loaded=True)
    out["ggg_losses"], out["nig_losses"] = ggg["losses"], nig["losses"]
    out["iig_to_ggg_diff"] = _agree(_max_difference(iig["at"], ggg["loaded"]))
    out["ggg_to_nig_diff"] = _agree(_max_difference(ggg["end"], nig["loaded"]))
    out["optim_keys"] = sum(k.startswith("optim.state.") for k in iig["at"])
    out["iig_scalars"] = iig["scalars"][2]
    out["params"] = sum(v.numel() for k, v in iig["at"].items() if k.startswith("model."))
    out["qwen3_iig"] = _run(_args(root / "qwen3", 3, (2, 2), "IIG", "--model.name", "qwen3"))["losses"]
    # torchtitan's bf16 compute: PaRO keeps a bf16 copy at P and the fp32 master at O.
    bf16 = ["--training.mixed_precision_param", "bfloat16"]
    out["bf16_stock"] = _run(_args(root / "bf16_stock", 3, (1, 4), None, *bf16))["losses"]
    bf16_iig = _run(_args(root / "bf16_iig", 3, (2, 2), "IIG", *bf16, *ckpt))
    out["bf16_iig"], out["bf16_scalars"] = bf16_iig["losses"], bf16_iig["scalars"][3]
    # Resume from its step-2 checkpoint: the masters were saved, so step 3 is the same.
    if dist.get_rank() == 0:
        shutil.copytree(root / "bf16_iig" / "checkpoint" / "step-2", root / "bf16_resumed" / "checkpoint" / "step-2")
    dist.barrier()
    out["bf16_resumed"] = _run(_args(root / "bf16_resumed", 3, (2, 2), "IIG", *bf16, *ckpt))["losses"]
    out["auto"] = _auto(root / "auto")
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
    try:
        losses = _run(_args(dump, 2, (2, 2), "auto"))["losses"]
    finally:
        paro_fsdp.probe.ADAPTIVE_SIZES = sizes
        logging.getLogger().removeHandler(messages)
    logs: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(logs, [m for m in messages.messages if "PaRO" in m])
    written: list[Any] = [(dump / "paro_calibration.json").is_file()]
    dist.broadcast_object_list(written, src=0)
    return {"losses": losses, "logs": logs, "calibration_written": written[0]}


def _scenarios_8(root: Path) -> dict[str, Any]:
    tp = ["--parallelism.tensor_parallel_degree", "2"]
    pp = ["--parallelism.pipeline_parallel_degree", "2", "--training.local_batch_size", "2",
          "--training.global_batch_size", "8"]
    return {
        f"{name}_{(strategy or 'stock').lower()}": _run(_args(root / f"{name}_{strategy}", 2, (2, 2), strategy, *extra))["losses"]
        for name, extra in (("tp", tp), ("pp", pp))
        for strategy in (None, "IIG")
    }


def _rank_main(world: int, root: Path, result: Path) -> None:
    from torchtitan.tools.logging import init_logger

    from torchtitan_patch.cpu import accelerator_available, enable_cpu_mode

    if not accelerator_available():
        enable_cpu_mode()
    init_logger()
    out = (_scenarios_4 if world == 4 else _scenarios_8)(root)
    import torch.distributed as dist

    if dist.get_rank() == dist.get_world_size() - 1:  # in the last PP stage, where the loss is
        result.write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- test side


def _launch(world: int, tmp: Path) -> dict[str, Any]:
    result = tmp / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
           "--standalone", __file__, str(world), str(tmp), str(result)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0 or not result.exists():
        pytest.fail(f"torchrun exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return json.loads(result.read_text())


@pytest.fixture(scope="module")
def four(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _launch(4, tmp_path_factory.mktemp("tt4"))


@pytest.fixture(scope="module")
def eight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _launch(8, tmp_path_factory.mktemp("tt8"))


def _curve(losses: dict[str, float]) -> list[float]:
    return [losses[k] for k in sorted(losses, key=int)]


def _assert_close(a: list[float], b: list[float], rtol: float = LOSS_RTOL) -> None:
    assert len(a) == len(b) and a, (a, b)
    for x, y in zip(a, b):
        assert math.isclose(x, y, rel_tol=rtol), (a, b)


def test_paro_matches_stock_hsdp_and_learns(four: dict[str, Any]) -> None:
    stock, iig = _curve(four["stock"]), _curve(four["iig"])
    _assert_close(iig, stock)
    assert iig[-1] < iig[0] - 0.5


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


def test_bf16_compute_keeps_a_bf16_copy_at_p_and_trains_like_stock_fsdp(four: dict[str, Any]) -> None:
    _assert_close(_curve(four["bf16_iig"]), _curve(four["bf16_stock"]), rtol=1e-3)
    assert sorted(four["bf16_resumed"], key=int) == ["3"]
    assert four["bf16_resumed"]["3"] == pytest.approx(four["bf16_iig"]["3"], rel=1e-6, abs=0)
    # IIG on 2x2: a 2-byte copy at P = I (1/m), AdamW's moments and the 4-byte master at O = G (1/n).
    scalars, params = four["bf16_scalars"], four["params"]
    assert scalars["paro/memory_params_bytes"] == pytest.approx(2 * params / 2, rel=0.01)
    assert scalars["paro/memory_optim_bytes"] == pytest.approx(12 * params / 4, rel=0.01)
    assert scalars["paro/comm_inter_bytes/sync_p"] == pytest.approx(2 * params / 4, rel=0.01)


def test_qwen3_trains_with_paro(four: dict[str, Any]) -> None:
    # Stock qwen3 debugmodel (tied embeddings) does not run under torch 2.13's FSDP2, which
    # rejects the shared weight across units; PaRO keeps tied weights in one unit.
    losses = _curve(four["qwen3_iig"])
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5


def test_auto_strategy_plans_logs_the_ranking_and_trains_the_choice(four: dict[str, Any]) -> None:
    auto, rank0 = four["auto"], four["auto"]["logs"][0]
    chosen = [m for m in rank0 if m.startswith("PaRO auto: chose ")]
    assert len(chosen) == 1, rank0
    code = chosen[0].split()[3].rstrip(",")
    table = next(m for m in rank0 if m.startswith("PaRO auto: strategies ranked")).splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("rank  strategy"))
    assert any(line.startswith("# model: Psi = ") for line in table[:header])
    rows = [line.split() for line in table[header + 1:]]
    assert len(rows) == 14 and rows[0][:2] == ["1", code], table
    for rank_logs in auto["logs"]:  # every rank wraps the model with rank 0's choice
        assert f"Applied PaRO {code} (chosen by paro_strategy='auto') (ho_ring) on 2 group(s) x 2 rank(s) to the model" \
            in rank_logs, rank_logs
    assert auto["calibration_written"]
    # Whatever it chose, it starts from stock HSDP's weights (torchtitan_patch.init) on the same
    # data, so step 1 agrees; then it must train.
    losses = _curve(auto["losses"])
    assert losses[0] == pytest.approx(_curve(four["stock"])[0], rel=LOSS_RTOL)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses) and losses[1] < losses[0] - 0.5, losses


def test_tensor_parallel_composes_with_paro(eight: dict[str, Any]) -> None:
    _assert_close(_curve(eight["tp_iig"]), _curve(eight["tp_stock"]))


def test_pipeline_parallel_composes_with_paro(eight: dict[str, Any]) -> None:
    _assert_close(_curve(eight["pp_iig"]), _curve(eight["pp_stock"]))


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
