"""``torchrun ... tests/fault_worker.py <torchtitan args>``: torchtitan_patch.train with a fault injected.

Test code only: the library has no fault hooks. This runs :func:`torchtitan_patch.train.main`
after wrapping a few of torchtitan's methods so that one rank kills itself with SIGKILL at a
chosen point, as a crashed host or an OOM-killed process would:

``PARO_FAULT="<point>:<step>:<rank>[:<attempt>]"`` (several separated by commas) with ``point`` one of

- ``forward``: in the first micro-batch's forward of step ``step``;
- ``optimizer``: inside the optimizer step of step ``step`` (after clipping, before the update);
- ``checkpoint``: while step ``step``'s checkpoint is being written (this rank's shard files
  are written, the checkpoint's ``.metadata`` is not);
- ``after_step``: after step ``step`` and its checkpoint save, before the next step;
- ``collective``: inside the first inter-node collective of step ``step``, once this rank has
  issued its part: an HO-Ring collective where the strategy runs one, else the strategy's own
  inter-group collective; its peers are mid-collective, waiting for data that never comes;
- ``hang``: like ``forward``, but the rank stops (SIGSTOP) instead of dying: its peers wait in
  a collective until the process group's timeout (``comm.train_timeout_seconds``).

A fault fires only in its attempt (``TORCHELASTIC_RESTART_COUNT``, default 0), so a job
restarted by torchrun runs clean unless another fault names the later attempt. ``PARO_FAULT_RECORD`` names a file every rank appends JSON
lines to: ``{"event": "start" | "step" | "kill" | "loaded", ...}`` with the attempt, rank,
wall time and, for steps, the loss at full precision (rank 0); ``"sigterm"`` when torchrun
stops a surviving rank, ``"exit"`` when a rank's interpreter exits (e.g. on a collective's error).
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import signal
import sys
import time
from typing import Any

ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
RANK = int(os.environ.get("RANK", "0"))
POINTS = ("forward", "optimizer", "checkpoint", "after_step", "collective", "hang")


def record(event: str, **fields: Any) -> None:
    path = os.environ.get("PARO_FAULT_RECORD")
    if not path:
        return
    line = json.dumps({"event": event, "attempt": ATTEMPT, "rank": RANK, "time": time.time(), **fields})
    with open(path, "a") as f:  # one short write per line: appends from several ranks do not interleave
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def die(point: str, step: int, **fields: Any) -> None:
    record("kill", point=point, step=step, **fields)
    os.kill(os.getpid(), signal.SIGSTOP if point == "hang" else signal.SIGKILL)


def _on_sigterm(signum: int, frame: Any) -> None:
    record("sigterm")
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def install() -> None:
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.metrics import MetricsProcessor

    from torchtitan_patch.version import adapter

    if adapter() == "v0_3":
        from torchtitan.trainer import Trainer
    else:
        from torchtitan.train import Trainer

    faults = []
    for fault in filter(None, os.environ.get("PARO_FAULT", "").split(",")):
        point_, step_, rank_, *attempt = fault.split(":")
        if point_ not in POINTS:
            raise ValueError(f"PARO_FAULT: unknown point {point_!r} in {fault!r}")
        if int(rank_) == RANK and int((attempt or ["0"])[0]) == ATTEMPT:
            faults.append((point_, int(step_)))
    armed = bool(faults)
    point, step = faults[0] if faults else ("", 0)
    current = {"step": 0}

    log = MetricsProcessor.log

    @functools.wraps(log)
    def log_and_record(self: Any, step_: int, loss: float, *args: Any, **kwargs: Any) -> None:
        if RANK == 0:
            record("step", step=step_, loss=float(loss))
        return log(self, step_, loss, *args, **kwargs)

    MetricsProcessor.log = log_and_record

    load = CheckpointManager.load

    @functools.wraps(load)
    def load_and_record(self: Any, step: int = -1) -> bool:
        loaded = load(self, step=step)
        if RANK == 0:
            record("loaded", loaded=bool(loaded), folder=self.folder,
                   step=self._find_load_step() if loaded and os.path.isdir(self.folder) else None)
        return loaded

    CheckpointManager.load = load_and_record

    train_step = Trainer.train_step

    @functools.wraps(train_step)
    def train_step_with_fault(self: Any, data: Any) -> Any:
        current["step"] = self.step
        if armed and point == "optimizer" and self.step == step:
            optimizers_step = self.optimizers.step

            def dying_step(*args: Any, **kwargs: Any) -> Any:
                die(point, step)
                return optimizers_step(*args, **kwargs)

            self.optimizers.step = dying_step
        return train_step(self, data)

    Trainer.train_step = train_step_with_fault

    forward_backward = Trainer.forward_backward_step

    @functools.wraps(forward_backward)
    def forward_backward_with_fault(self: Any, *args: Any, **kwargs: Any) -> Any:
        if armed and point in ("forward", "hang") and self.step == step:
            die(point, step)
        return forward_backward(self, *args, **kwargs)

    Trainer.forward_backward_step = forward_backward_with_fault

    save = CheckpointManager.save

    @functools.wraps(save)
    def save_with_fault(self: Any, curr_step: int, last_step: bool = False) -> None:
        save(self, curr_step, last_step)
        if armed and point == "after_step" and curr_step == step:
            die(point, step)

    CheckpointManager.save = save_with_fault

    write_data = FileSystemWriter.write_data

    @functools.wraps(write_data)
    def write_data_with_fault(self: Any, plan: Any, planner: Any) -> Any:
        future = write_data(self, plan, planner)
        if armed and point == "checkpoint" and current["step"] == step:
            future.wait()  # this rank's files are on disk; the coordinator's .metadata is not
            die(point, step)
        return future

    FileSystemWriter.write_data = write_data_with_fault

    if armed and point == "collective":
        _kill_in_collective(lambda: current["step"] == step, step)


def _kill_in_collective(now: Any, step: int) -> None:
    """Die in the first inter-node collective the engine issues while ``now()`` holds, right
    after issuing it: inside an HO-Ring collective where the strategy has one (its first
    inter-group chunk), else in the strategy's own inter-group collective (e.g. IIG's sync_p)."""
    from paro_fsdp.comm.groups import MeshGroups
    from paro_fsdp.comm.ho_ring import HORingCollectives
    from paro_fsdp.comm.stats import INTER, current_phase

    inside = {"ho_ring": ""}
    for name in ("all_gather", "reduce_scatter", "all_reduce"):
        method = getattr(HORingCollectives, name)

        def named(self: Any, *args: Any, _method: Any = method, _name: str = name, **kwargs: Any) -> Any:
            inside["ho_ring"] = _name
            try:
                return _method(self, *args, **kwargs)
            finally:
                inside["ho_ring"] = ""

        setattr(HORingCollectives, name, functools.wraps(method)(named))
    for name in ("start_all_gather", "start_reduce_scatter", "start_all_reduce"):
        method = getattr(MeshGroups, name)

        def issued_then_die(self: Any, *args: Any, _method: Any = method, _name: str = name, **kwargs: Any) -> Any:
            pending = _method(self, *args, **kwargs)
            link = next((a for a in (*args, *kwargs.values()) if isinstance(a, str)), None)
            if now() and link == INTER:
                what = f"HO-Ring {inside['ho_ring']}" if inside["ho_ring"] else _name.removeprefix("start_")
                die("collective", step, collective=what, phase=current_phase())
            return pending

        setattr(MeshGroups, name, functools.wraps(method)(issued_then_die))


def main() -> None:
    record("start", pid=os.getpid())
    signal.signal(signal.SIGTERM, _on_sigterm)
    atexit.register(record, "exit")
    from torchtitan_patch.cpu import accelerator_available, enable_cpu_mode

    if not accelerator_available():
        enable_cpu_mode()
    install()
    from torchtitan_patch.train import main as train_main

    train_main()


if __name__ == "__main__":
    sys.argv[0] = "torchtitan_patch.train"
    main()
