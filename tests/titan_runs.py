"""torchtitan's trainer in-process, for the tests that launch it on several CPU ranks.

A test file launches itself with :func:`launch`; each rank runs :func:`rank_main`, in which
torchtitan trainers for several configurations run one after another on the same process
group (tiny debug model, a few steps, :func:`run` each), and the last rank writes what they
measured to a JSON file the test reads.
"""

from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from torchtitan_patch.version import adapter

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "train_configs" / "llama3_debug_paro.toml"
ADAPTER = adapter()  # the same scenarios run on torchtitan 0.2.2 (TOML) and 0.3 (config functions)
LOSS_RTOL = 1e-4  # stock FSDP vs PaRO: same math, different reduction order
TIMEOUT_S = 900


def args(dump: Path, steps: int, dp: tuple[int, int], strategy: str | None, *extra: str,
         ac: str = "none", model: str = "llama3") -> list[str]:
    """The debug job's command line, shrunk: ``steps`` steps of 2 micro-batches of 64 tokens on a
    ``dp`` = (groups, ranks per group) layout, under ``strategy`` (None: stock torchtitan).

    On torchtitan 0.2.2 it is ``train_configs/llama3_debug_paro.toml`` (``model`` switches
    ``model.name``); on 0.3 the config function of the same name for ``model``, with the
    activation-checkpointing mode as tyro's subcommand, which comes last.
    """
    g, m = dp
    if ADAPTER == "v0_3":
        head = ["--module", "torchtitan_patch.v0_3", "--config", f"{model}_debug_paro", "--dump_folder", str(dump)]
        tail = [f"activation-checkpoint:{ac}"]
    else:
        head = ["--job.config_file", str(CONFIG), "--job.dump_folder", str(dump), "--model.name", model,
                "--activation_checkpoint.mode", ac]
        tail = []
    return [
        *head,
        "--training.steps", str(steps),
        "--training.seq_len", "64",
        "--training.local_batch_size", "1",
        "--training.global_batch_size", str(2 * g * m),  # 2 micro-batches per step
        "--lr_scheduler.warmup_steps", "1",
        "--metrics.no-enable-tensorboard",
        "--parallelism.data_parallel_replicate_degree", str(g),
        "--parallelism.data_parallel_shard_degree", str(m),
        "--parallelism.paro_strategy", strategy or "None",
        # The config's paro_comm = "auto" probes and plans at start-up; runs compared with each
        # other pin the collectives, so that both run the same sums.
        *(["--parallelism.paro_comm", "ho_ring"] if strategy and "--parallelism.paro_comm" not in extra else []),
        *extra,
        *tail,
    ]


def full(value: Any) -> Any:
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        value = value.full_tensor()
    return value.detach().clone() if hasattr(value, "detach") else value


def snapshot(trainer: Any) -> dict[str, Any]:
    """Every parameter and optimizer-state entry, gathered to full tensors."""
    state = {f"model.{k}": full(v) for m in trainer.model_parts for k, v in m.state_dict().items()}
    state.update({f"optim.{k}": full(v) for k, v in trainer.optimizers.state_dict().items()})
    return state


def max_difference(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, str]:
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


def run(argv: list[str], stop_after: int | None = None, snapshot_at: int | None = None,
        snapshot_loaded: bool = False, replay_from: int | None = None,
        snapshot_end: bool = True) -> dict[str, Any]:
    """Train with torchtitan's trainer (after loading its checkpoint, if any).

    ``stop_after`` interrupts the run after that step and saves a checkpoint, as a job that
    is stopped and will be resumed. Snapshots are taken right after loading ("loaded", only
    when asked: reading a fresh optimizer's state initializes it), at step ``snapshot_at``
    ("at") and at the end ("end", unless ``snapshot_end`` is off). ``replay_from`` then loads
    the checkpoint saved at that step into the same trainer and trains to the end again:
    "replayed" holds those losses and "replayed_from" the step the load restored. "compiled"
    says whether the model's modules were ``torch.compile``'d.
    """
    from torch._dynamo.eval_frame import OptimizedModule
    from torchtitan.config import ConfigManager

    config = ConfigManager().parse_args(argv)
    if ADAPTER == "v0_3":
        trainer = config.build()
    else:
        from torchtitan.train import Trainer

        trainer = Trainer(config)
    out: dict[str, Any] = {"losses": {}}
    losses = [out["losses"]]  # where the next logged losses go
    log = trainer.metrics_processor.log

    def record(step: int, loss: float, *rest: Any, **kw: Any) -> None:
        losses[0][step] = float(loss)
        log(step, loss, *rest, **kw)

    trainer.metrics_processor.log = record
    backend_log = trainer.metrics_processor.logger.log  # what TensorBoard / W&B receive

    def record_scalars(metrics: dict[str, Any], step: int) -> None:
        out.setdefault("scalars", {})[step] = {k: v for k, v in metrics.items() if k.startswith("paro/")}
        backend_log(metrics, step)

    trainer.metrics_processor.logger.log = record_scalars
    trainer.checkpointer.load(step=config.checkpoint.load_step)
    if snapshot_loaded:
        out["loaded"] = snapshot(trainer)
    last = config.training.steps if stop_after is None else stop_after
    _train(trainer, last, out, snapshot_at)
    if snapshot_end:
        out["end"] = snapshot(trainer)
    if replay_from is not None:
        trainer.checkpointer.load(step=replay_from)
        out["replayed_from"], out["replayed"] = trainer.step, {}
        losses[0] = out["replayed"]
        _train(trainer, last, out, None)
    out["compiled"] = any(isinstance(m, OptimizedModule) for part in trainer.model_parts for m in part.modules())
    trainer.close()
    del trainer
    gc.collect()
    return out


def _train(trainer: Any, last: int, out: dict[str, Any], snapshot_at: int | None) -> None:
    """Steps up to ``last``, saving a checkpoint after each as torchtitan's loop does."""
    data = trainer.batch_generator(trainer.dataloader)
    while trainer.step < last:
        trainer.step += 1
        trainer.train_step(data)
        trainer.checkpointer.save(trainer.step, last_step=trainer.step == last)
        if trainer.step == snapshot_at:
            out["at"] = snapshot(trainer)


def agree(difference: tuple[float, str]) -> tuple[float, str]:
    """The largest difference over ranks (each rank compares its own gathered state)."""
    import torch.distributed as dist

    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, difference)
    return max(everyone, key=lambda d: d[0])


def launch(script: str, world: int, tmp: Path, *extra: str) -> dict[str, Any]:
    """``torchrun`` ``script`` on ``world`` CPU ranks with ``tmp``, the result path and ``extra``
    as its arguments; what the script's last rank wrote there."""
    result = tmp / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
           "--standalone", script, str(tmp), str(result), *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0 or not result.exists():
        pytest.fail(f"torchrun exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return json.loads(result.read_text())


def rank_main(scenarios: Callable[[Path], dict[str, Any]], root: Path, result: Path) -> None:
    """A launched rank: CPU mode where there is no accelerator, then ``scenarios(root)``; the last
    rank (the last pipeline stage, where the loss is) writes what it returned to ``result``."""
    import torch
    import torch.distributed as dist
    from torchtitan.tools.logging import init_logger

    from torchtitan_patch.cpu import accelerator_available, enable_cpu_mode

    if not accelerator_available():
        enable_cpu_mode()
    # Runs one after another reuse compiled blocks where their guards hold; one that needs more
    # recompiles than this fails rather than silently running eagerly.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    init_logger()
    out = scenarios(root)
    if dist.get_rank() == dist.get_world_size() - 1:
        result.write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def curve(losses: dict[str, float]) -> list[float]:
    return [losses[k] for k in sorted(losses, key=int)]


def assert_close(a: list[float], b: list[float], rtol: float = LOSS_RTOL) -> None:
    assert len(a) == len(b) and a, (a, b)
    for x, y in zip(a, b):
        assert math.isclose(x, y, rel_tol=rtol), (a, b)
