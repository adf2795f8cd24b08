"""A job restarted by torchrun after a rank is killed resumes from its last complete checkpoint.

Two CPU launches of ``torchrun --max-restarts 2 ... tests/fault_worker.py`` (the trainer of
``python -m torchtitan_patch.train`` with a fault injected by test code), PaRO IIG on 2x2,
7 steps, a checkpoint every 3 steps:

- reference: no fault;
- faulted: rank 1 is SIGKILLed after step 4 (step 3's checkpoint is the last complete one);
  in the restarted job rank 2 is SIGKILLed while step 6's checkpoint is being written (its
  shard files are on disk, the checkpoint's ``.metadata`` is not); the third attempt runs to
  the end.

Two more jobs: NIG with rank 1 killed inside an HO-Ring collective (its sync_p), and IIG on
the emulated cluster (2 nodes x 2 ranks, a torchrun per node) with both ranks of node 1 killed.

Both restarts must start (the agent's store keeps the previous attempt's keys: see
``torchtitan_patch.elastic``), both must resume from step 3 (the interrupted step-6 save is
never taken as the latest), and every loss after the resume must equal the uninterrupted
run's at the same step (same data order: the dataloader state is in the checkpoint).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from titan_runs import args

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "fault_worker.py"
STEPS, INTERVAL = 7, 3


def train_args(dump: Path, steps: int, strategy: str = "IIG", interval: int = INTERVAL) -> list[str]:
    """The debug job on 2 x 2 ranks, 2 micro-batches per step, a checkpoint every ``interval`` steps."""
    return args(dump, steps, (2, 2), strategy, "--checkpoint.enable", "--checkpoint.interval", str(interval))


def launch(dump: Path, argv: list[str], fault: str = "", max_restarts: int = 2,
           timeout: float = 600) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    """One torchrun of 4 ranks; returns the process and the worker's event records."""
    dump.mkdir(parents=True, exist_ok=True)
    record = dump / "events.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           "--max-restarts", str(max_restarts), str(WORKER), *argv]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PARO_FAULT": fault, "PARO_FAULT_RECORD": str(record)}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    events = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    return proc, events


def losses(events: list[dict[str, Any]], attempt: int | None = None) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events
            if e["event"] == "step" and (attempt is None or e["attempt"] == attempt)}


def _check(proc: subprocess.CompletedProcess[str]) -> None:
    if proc.returncode != 0:
        pytest.fail(f"torchrun exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("recovery")
    reference, ref_events = launch(root / "reference", train_args(root / "reference", STEPS), max_restarts=0)
    _check(reference)
    faulted, events = launch(root / "faulted", train_args(root / "faulted", STEPS),
                             fault="after_step:4:1:0,checkpoint:6:2:1")
    _check(faulted)
    return {"reference": losses(ref_events), "events": events, "folder": root / "faulted" / "checkpoint"}


def test_killed_rank_restarts_and_resumes_from_the_last_complete_checkpoint(runs: dict[str, Any]) -> None:
    events = runs["events"]
    kills = [(e["attempt"], e["rank"], e["point"], e["step"]) for e in events if e["event"] == "kill"]
    assert kills == [(0, 1, "after_step", 4), (1, 2, "checkpoint", 6)], kills
    loads = [(e["attempt"], e["loaded"], e["step"]) for e in events if e["event"] == "loaded"]
    # Attempt 2 skips step 6's interrupted save (shard files, no .metadata) and takes step 3.
    assert loads == [(0, False, None), (1, True, 3), (2, True, 3)], loads
    assert sorted(losses(events, attempt=2)) == list(range(4, STEPS + 1))
    # The retried save of step 6 completed this time.
    assert (runs["folder"] / "step-6" / ".metadata").is_file()


def test_resumed_losses_equal_an_uninterrupted_run(runs: dict[str, Any]) -> None:
    reference, events = runs["reference"], runs["events"]
    assert sorted(reference) == list(range(1, STEPS + 1))
    for attempt in (0, 1, 2):
        for step, loss in losses(events, attempt).items():
            assert loss == pytest.approx(reference[step], rel=1e-6, abs=0), (attempt, step, loss, reference[step])


def _after_restart(events: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[int, float]]:
    """The first kill, and rank 0's losses logged after the first start that followed it."""
    kill = next(e for e in events if e["event"] == "kill")
    restart = min(e["time"] for e in events if e["event"] == "start" and e["time"] > kill["time"])
    return kill, {e["step"]: e["loss"] for e in events if e["event"] == "step" and e["time"] > restart}


def test_a_rank_killed_inside_an_ho_ring_collective_recovers(tmp_path: Path) -> None:
    """NIG's sync_p is a global all-gather, run by HO-Ring (the config's paro_comm): rank 1 dies
    right after issuing its first inter-group chunk of step 5, its peers mid-collective."""
    reference, ref_events = launch(tmp_path / "reference", train_args(tmp_path / "reference", STEPS, "NIG"),
                                   max_restarts=0)
    _check(reference)
    faulted, events = launch(tmp_path / "faulted", train_args(tmp_path / "faulted", STEPS, "NIG"),
                             fault="collective:5:1", max_restarts=1)
    _check(faulted)
    kill, after = _after_restart(events)
    assert kill["collective"].startswith("HO-Ring") and kill["phase"] == "sync_p", kill
    assert sorted(after) == list(range(4, STEPS + 1))  # resumed from step 3's checkpoint
    expected = losses(ref_events)
    for step, loss in after.items():
        assert loss == pytest.approx(expected[step], rel=1e-6, abs=0), (step, loss, expected[step])


def test_a_whole_node_killed_on_the_emulated_cluster_rejoins(runs: dict[str, Any], tmp_path: Path) -> None:
    """2 nodes x 2 ranks, one torchrun per node with --max-restarts 1: both ranks of node 1 die in
    step 5's forward; node 1's torchrun restarts them, node 0's its own, and the job resumes."""
    from paro_fsdp.cluster import EmulatedCluster
    from paro_fsdp.cluster.network import missing_requirements

    if (reason := missing_requirements()) is not None:
        pytest.skip(f"emulated cluster unavailable: {reason}")
    record = tmp_path / "events.jsonl"
    env = {"PARO_FAULT": "forward:5:2,forward:5:3", "PARO_FAULT_RECORD": str(record)}
    with EmulatedCluster(2, 2, "1gbit", max_restarts=1) as cluster:
        result = cluster.run([str(WORKER), *train_args(tmp_path / "dump", STEPS)], timeout=600, env=env,
                             echo=lambda line: None)
    assert result.ok, "\n".join(line for node in result.nodes for line in node.output[-40:])
    events = [json.loads(line) for line in record.read_text().splitlines()]
    assert sorted(e["rank"] for e in events if e["event"] == "kill") == [2, 3]
    _, after = _after_restart(events)
    assert sorted(after) == list(range(4, STEPS + 1))
    for step, loss in after.items():
        assert loss == pytest.approx(runs["reference"][step], rel=1e-6, abs=0), (step, loss)


def test_attempt_prefix_scopes_the_agent_store_by_run_attempt_and_world() -> None:
    from torchtitan_patch.elastic import attempt_prefix

    env = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": "job",
           "TORCHELASTIC_RESTART_COUNT": "2", "WORLD_SIZE": "4"}
    assert attempt_prefix(env) == "torchelastic/job/attempt_2/world_4"
    assert attempt_prefix({**env, "TORCHELASTIC_RESTART_COUNT": "3"}) != attempt_prefix(env)
    # Not under a shared agent store (plain env://, or TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1): untouched.
    assert attempt_prefix({**env, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None
    assert attempt_prefix({}) is None


def test_the_default_group_is_created_on_the_attempts_store_and_every_group_gets_the_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """In one process: under a shared agent store (a TCPStore server here), torchtitan's
    ``init_process_group`` call is given this attempt's prefixed store, and the training timeout
    reaches a group created after torchtitan's meshes (as PaRO's flattened mesh is)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    import torchtitan_patch.elastic as elastic

    agent = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timedelta(seconds=30))
    agent.set("torchelastic/job/attempt_1/world_1/written by the agent", "this attempt")
    for key, value in {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": "job",
                       "TORCHELASTIC_RESTART_COUNT": "1", "WORLD_SIZE": "1", "RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(agent.port)}.items():
        monkeypatch.setenv(key, value)
    stores: list[Any] = []

    def attempt_store(timeout: timedelta) -> Any:
        stores.append(elastic.attempt_store.__wrapped__(timeout))  # type: ignore[attr-defined]
        return stores[-1]

    attempt_store.__wrapped__ = elastic.attempt_store  # type: ignore[attr-defined]
    monkeypatch.setattr(elastic, "attempt_store", attempt_store)

    def init_distributed() -> int:  # as torchtitan's: env://, a timeout, no store
        dist.init_process_group(backend="gloo", timeout=timedelta(seconds=60))
        return dist.get_world_size()

    original = dist.init_process_group
    assert elastic.restart_safe(init_distributed)() == 1
    try:
        assert len(stores) == 1 and stores[0].get("written by the agent") == b"this attempt"
        assert dist.init_process_group is original  # only replaced while torchtitan's init runs
        later = dist.new_group([0])
        assert elastic.set_timeout_everywhere(timedelta(seconds=7)) >= 2
        assert later._get_backend(torch.device("cpu")).options._timeout == timedelta(seconds=7)
    finally:
        dist.destroy_process_group()


def test_a_rank_stopped_while_writing_its_error_file_leaves_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torchrun's agent parses the error file of every failed rank and crashes on a partial one.
    import builtins

    import torchtitan_patch  # noqa: F401  (installs the hooks)
    from torch.distributed.elastic.multiprocessing.errors.error_handler import ErrorHandler

    error_file = tmp_path / "error.json"
    ErrorHandler()._write_error_file(str(error_file), '{"message": "whole"}')
    assert error_file.read_text() == '{"message": "whole"}'
    error_file.unlink()

    class Stopped(BaseException):
        pass

    real_open = builtins.open

    class Interrupted:
        def __init__(self, f: Any) -> None:
            self.f = f

        def __enter__(self) -> Any:
            return self

        def __exit__(self, *exc: Any) -> None:
            self.f.close()

        def write(self, text: str) -> None:
            self.f.write(text[:3])
            raise Stopped  # SIGTERM between the start and the end of the write

    monkeypatch.setattr(builtins, "open", lambda path, mode="r", *a, **k: Interrupted(real_open(path, mode, *a, **k)))
    with pytest.raises(Stopped):
        ErrorHandler()._write_error_file(str(error_file), '{"message": "whole"}')
    monkeypatch.undo()
    assert not error_file.exists()
