"""The fault matrix: kill (or stop) one rank of a torchrun job at a chosen point, per strategy, and measure recovery.

    .venv/bin/python scripts/fault_matrix.py                        # all faults x IIG, NIG, GGG, stock HSDP (hang: IIG, stock)
    .venv/bin/python scripts/fault_matrix.py --strategies IIG --faults forward,checkpoint

Each cell is one ``torchrun --standalone --max-restarts 1 --nproc-per-node 4`` of
``tests/fault_worker.py`` (``python -m torchtitan_patch.train`` with a fault injected by test
code) on llama3's debug model, 2 groups x 2 ranks, 8 steps of 2 micro-batches, a checkpoint
every 3 steps, compared with an uninterrupted run of the same strategy. Faults (one rank):

- forward: SIGKILL in the forward of step 5;
- optimizer: SIGKILL inside the optimizer step of step 5 (after clipping, before the update);
- checkpoint: SIGKILL of rank 0, DCP's coordinator, while step 6's checkpoint is written
  (its shard files written, the checkpoint's .metadata not);
- after_step: SIGKILL after step 4 (between steps);
- collective: SIGKILL inside step 5's first HO-Ring collective, once the rank has issued its part;
- hang: SIGSTOP in the forward of step 5: the rank stays alive, its peers wait in a
  collective until ``comm.train_timeout_seconds`` (set to 20 s here; torchtitan's default is 100);
- node: on the emulated cluster (``paro_fsdp.cluster``, 2 nodes x 2 ranks, 1 gbit, one torchrun
  per node with ``--max-restarts 1``), both ranks of node 1 SIGKILLed in the forward of step 5;
  node 1's torchrun restarts them, node 0's restarts its own, and the job resumes.

Per cell: outcome, the step resumed from, whether every loss after the restart equals the
uninterrupted run's, time to detect (fault -> first surviving rank stopped or failing), to
restart (fault -> new workers started), to get back to where the fault struck (fault -> the
resumed job completes the last step the failed job had completed), and the steps lost
(completed steps computed again). Writes ``docs/RELIABILITY.md`` (``--out``) and the raw
numbers beside it as JSON (``--from-json`` renders the document from them again).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "fault_worker.py"
CONFIG = REPO / "train_configs" / "llama3_debug_paro.toml"
STEPS, INTERVAL = 8, 3
FAULTS = {  # name -> (PARO_FAULT point, step, ranks)
    "forward": ("forward", 5, (1,)),
    "optimizer": ("optimizer", 5, (1,)),
    "checkpoint": ("checkpoint", 6, (0,)),
    "after_step": ("after_step", 4, (1,)),
    "collective": ("collective", 5, (1,)),
    "hang": ("hang", 5, (1,)),
    "node": ("forward", 5, (2, 3)),  # every rank of node 1 of 2 x 2, on the emulated cluster
}
CLUSTER_FAULTS = ("node",)
HANG_TIMEOUT_S = 20


def train_args(dump: Path, strategy: str, *extra: str) -> list[str]:
    return [
        "--job.config_file", str(CONFIG), "--job.dump_folder", str(dump),
        "--training.steps", str(STEPS), "--training.seq_len", "64",
        "--training.local_batch_size", "1", "--training.global_batch_size", "8",
        "--lr_scheduler.warmup_steps", "1", "--metrics.no-enable-tensorboard",
        "--activation_checkpoint.mode", "none", "--parallelism.paro_strategy", strategy,
        "--checkpoint.enable", "--checkpoint.interval", str(INTERVAL), *extra,
    ]


def launch(dump: Path, args: list[str], fault: str = "", timeout: float = 900,
           cluster: bool = False) -> tuple[int, float, list[dict[str, Any]], str]:
    """One job with ``--max-restarts 1``: a standalone torchrun of 4 ranks, or 2 x 2 on the emulated cluster."""
    dump.mkdir(parents=True, exist_ok=True)
    record = dump / "events.jsonl"
    env = {"PYTHONPATH": str(REPO), "PARO_FAULT": fault, "PARO_FAULT_RECORD": str(record)}
    begin = time.time()
    if cluster:
        from paro_fsdp.cluster import EmulatedCluster

        with EmulatedCluster(2, 2, "1gbit", max_restarts=1) as nodes:
            result = nodes.run([str(WORKER), *args], timeout=timeout, env=env, echo=lambda line: None)
        codes = [n.returncode for n in result.nodes]
        rc = -1 if result.timed_out else next((c for c in codes if c), 0)
        tail = "\n".join(line for n in result.nodes for line in n.output[-30:])
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
               "--max-restarts", "1", str(WORKER), *args]
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, **env})
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired:
            rc, tail = -1, f"timed out after {timeout} s"
    events = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    return rc, time.time() - begin, events, tail


def losses(events: list[dict[str, Any]], begin: float = 0.0, end: float = math.inf) -> dict[int, float]:
    """Rank 0's loss per step, of the steps logged between ``begin`` and ``end`` (wall time)."""
    return {e["step"]: e["loss"] for e in events if e["event"] == "step" and begin <= e["time"] < end}


def measure(name: str, strategy: str, rc: int, events: list[dict[str, Any]], reference: dict[int, float]) -> dict[str, Any]:
    cell: dict[str, Any] = {"fault": name, "strategy": strategy, "rc": rc}
    kill = next((e for e in events if e["event"] == "kill"), None)
    if kill is None:
        return {**cell, "outcome": f"fault did not fire (exit {rc})"}
    t0 = kill["time"]
    killed = {e["rank"] for e in events if e["event"] == "kill"}
    # The restart is the first start after the fault. Under one torchrun it raises every rank's
    # attempt; across nodes a node restarted for a peer node's failure may keep its count.
    restarted = [e["time"] for e in events if e["event"] == "start" and e["time"] > t0]
    t1 = min(restarted, default=math.inf)
    survivors = [e["time"] for e in events if e["event"] in ("sigterm", "exit")
                 and e["rank"] not in killed and t0 <= e["time"] < t1]
    loaded = next((e for e in events if e["event"] == "loaded" and e["time"] > t1), None)
    before, after = losses(events, end=t0), losses(events, begin=t1)
    last_done = max(before, default=0)
    caught_up = next((e["time"] for e in events if e["event"] == "step" and e["time"] > t1
                      and e["step"] == last_done), None)
    resumed_from = loaded["step"] if loaded and loaded["loaded"] else 0
    compared = [abs(after[s] - reference[s]) / abs(reference[s]) for s in after if s in reference]
    complete = sorted(after) == list(range(resumed_from + 1, STEPS + 1))
    cell.update({
        "kill_step": kill["step"], "kill_ranks": sorted(killed), "last_completed": last_done,
        **({"collective": kill["collective"], "phase": kill["phase"]} if "collective" in kill else {}),
        "resumed_from": resumed_from if loaded else None,
        "detect_s": min(survivors) - t0 if survivors else None,
        "restart_s": t1 - t0 if restarted else None,
        "caught_up_s": caught_up - t0 if caught_up else None,
        "steps_lost": last_done - resumed_from if loaded else None,
        "max_rel_loss_diff": max(compared) if compared else None,
    })
    if rc == 0 and complete and compared and max(compared) <= 1e-6:
        cell["outcome"] = "recovered, losses equal"
    elif rc == 0 and complete:
        cell["outcome"] = "recovered, losses differ"
    else:
        cell["outcome"] = f"failed (exit {rc})"
    return cell


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render(cells: list[dict[str, Any]], wall: float) -> str:
    rows = "\n".join(
        f"| {c['fault']} | {c['strategy']} | {c['outcome']} | {c.get('resumed_from', '-')} | "
        f"{_s(c.get('detect_s'))} | {_s(c.get('restart_s'))} | {_s(c.get('caught_up_s'))} | {c.get('steps_lost', '-')} |"
        for c in cells
    )
    hit = "; ".join(f"{c['strategy']}: {c['collective']} ({c['phase']})" for c in cells if c.get("collective"))
    return f"""# Reliability

How a PaRO torchtitan job behaves when a rank fails, and what protects its checkpoints.
Generated by `scripts/fault_matrix.py` (the table) on this repository's CPU set-up: 4 gloo
ranks as 2 groups x 2 on one machine, llama3 debug model, {STEPS} steps of 2 micro-batches,
`seq_len` 64, a checkpoint every {INTERVAL} steps, `torchrun --standalone --max-restarts 1`.
Times are wall-clock seconds from the fault, on a 2-core machine. The `forward` to `hang`
cells were measured while other jobs loaded it heavily (load average 20 to 50), the
`collective` and `node` cells (added with `--add`) on an idle machine: the seconds that involve
starting 4 trainers (back at fault step) are several times longer under load, so compare them
within one set; detection does not depend on it. {wall / 60:.0f} minutes for the whole matrix.

## Fault matrix

One rank of a running job (for `node`, every rank of one node) is killed (SIGKILL) or
stopped (SIGSTOP) at the point named; torchrun stops the other ranks, restarts all four, and
the new job resumes from the latest complete checkpoint. "losses equal": every step after the restart has the uninterrupted
run's loss to 1e-6 relative (same data order: the dataloader state is in the checkpoint).

| fault | strategy | outcome | resumed from step | detect (s) | restart (s) | back at fault step (s) | steps lost |
| --- | --- | --- | --- | --- | --- | --- | --- |
{rows}

- Faults: `forward`: rank 1 killed in the forward of step 5; `optimizer`: rank 1 killed
  inside step 5's optimizer step (after clipping, before the update); `checkpoint`: rank 0
  (DCP's coordinator) killed while step 6's checkpoint is written (its shard files are, the
  checkpoint's `.metadata` is not); `after_step`: rank 1 killed after step 4; `collective`:
  rank 1 killed inside step 5's first inter-node collective, right after it issued its part,
  so that its peers are mid-collective: an HO-Ring collective (`paro_comm = "ho_ring"`) where
  the strategy has one, else its own inter-group collective (IIG's transfers each stay on one
  link, so it runs none); hit: {hit or "-"}; `hang`: rank 1
  stopped in the forward of step 5 (alive, silent), with `comm.train_timeout_seconds = {HANG_TIMEOUT_S}`.
- `node`: the same job on the emulated cluster (`python -m paro_fsdp.cluster --nodes 2
  --ranks-per-node 2 --inter-bw 1gbit --max-restarts 1`: two network namespaces, one torchrun
  each); both ranks of node 1 killed in the forward of step 5. Node 1's torchrun restarts its
  workers, node 0's restarts its own (they failed on the lost peers), and the two rejoin one
  rendezvous. Across nodes the workers of one round can disagree on torchrun's restart count
  (a node whose workers were healthy restarts them for the rejoining node without counting a
  failure), so the launcher gives every round a fresh store (`TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`);
  do the same on a real multi-node job that sets `--max-restarts`.
- detect: from the fault to the first surviving rank stopped by torchrun or failing on its
  own (a collective's error). A dead rank is seen by torchrun's agent, which polls its
  workers, within a fraction of a second; a stopped rank only when its peers' collective
  times out (`comm.train_timeout_seconds`, torchtitan's default 100 s, after the first step).
- restart: to the restarted workers' start. A stopped rank cannot act on torchrun's SIGTERM,
  so the agent waits out its own shutdown timeout (30 s) before it kills it and restarts.
- back at fault step: to the resumed job completing the last step the failed job had
  completed (start-up, checkpoint load and the steps lost).
- steps lost: completed steps computed again (last completed step - checkpoint step); a
  shorter `checkpoint.interval` loses fewer.
- `stock`: torchtitan's own HSDP on the same 2 x 2 layout (`paro_strategy` unset).

## What it took

Four fixes, all in `torchtitan_patch` (torch and torchtitan are not patched on disk):

- Restarts never started. Every restart failed: the new workers died in
  `init_process_group` with `Gloo connectFullMesh failed ... Connection refused`, and the job
  exited, whatever the strategy (stock HSDP too). Cause, below PaRO and torchtitan: under
  torchrun's c10d rendezvous the workers bootstrap from the elastic agent's own TCPStore,
  which torch 2.13's agent creates once and keeps across restarts, while the workers' store
  has no per-attempt prefix (torch assumes a new store per retry). The previous attempt's
  keys (gloo's listening address of every rank) are still there, and a new rank connects to
  a dead worker's address. `torchtitan_patch.elastic` scopes the default process group's
  store to the attempt (`TORCHELASTIC_RUN_ID`, `TORCHELASTIC_RESTART_COUNT`, `WORLD_SIZE`);
  every later group derives from it. It is installed by `custom_import = "torchtitan_patch"`,
  so `-m torchtitan.train` on GPUs gets it too. For elastic jobs whose membership changes
  without a failure (the restart count stays), launch torchrun with
  `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` (a fresh store per rendezvous round).
- Saved parameters mid-update. PaRO leaves each step's parameter update (sync_p) in flight
  until something reads the parameters, and finishes it in the model's `state_dict` hooks;
  torchtitan hands DCP a state dict it cached once, so the hooks never ran on a save and
  checkpoints held some shards one update behind (resumed step-4 loss 4.758 instead of 4.510).
  `torchtitan_patch.checkpoint` finishes in-flight updates before every save and load.
- A hung rank was never detected under PaRO. torchtitan shortens the collective timeout to
  `comm.train_timeout_seconds` after the first step, but only on its own meshes' groups;
  PaRO's (the flattened data-parallel mesh, HO-Ring's) kept c10d's default, 30 minutes on
  gloo, and the IIG `hang` cell was still waiting after 6 minutes. `torchtitan_patch.elastic`
  now applies it to every process group (and PaRO's mesh groups adopt the default group's
  timeout when they are created, see Timeouts below).
- torchrun's agent crashed instead of restarting (the `optimizer x stock` cell, once in 20
  runs): a surviving rank, failing on its dead peer's connection, was terminated while
  torch's `@record` was writing its error file (truncate, then write); the agent cannot parse
  an empty file and raises. Workers now write the file to a temporary name and rename it.
  That cell was measured again after the fix.

## Checkpoints

- An interrupted save is never resumed from: DCP writes a checkpoint's `.metadata` last
  (atomically, after every rank's files) and torchtitan only loads step folders that have
  one. Saving a step again into a folder that holds a complete checkpoint (after
  `--checkpoint.load_step`) first removes the old `.metadata`, so an interrupted re-save is
  incomplete rather than old index over mixed files.
- Every synchronous save writes `paro_manifest.json` beside the files: each file's size and
  CRC-32, computed by the rank that wrote it, and the save's id. Before a load every file the
  index refers to must be present and long enough, and with a manifest of the same save have
  its size and CRC (the files are spread over the ranks to check). A damaged checkpoint stops
  the load on every rank with an error naming the file and the other complete checkpoints
  (`--checkpoint.load_step N`). `checkpoint.paro_checksums = false` skips the manifest.
- A checkpoint that does not fit stops before anything is read, saying what to do: another
  model or flavor (missing, extra or reshaped parameters), a model-only checkpoint resumed
  as a full one, dataloader state of another data-parallel degree
  (`--checkpoint.exclude_from_loading dataloader`).
- Tests: `tests/test_recovery.py`, about 2 min on an idle 2-core machine:
  - a 4-rank IIG job killed after step 4, then again while saving step 6 (two restarts, both
    resume from step 3);
  - NIG with a rank killed inside an HO-Ring collective (its sync_p);
  - IIG on the emulated cluster with both ranks of one node killed (skipped without root).

  In each, the losses after the resume equal the uninterrupted run's.
  `tests/test_checkpoint_integrity.py` runs in one process, in about 15 s.
"""


BEGIN, END = "<!-- fault-matrix:begin -->", "<!-- fault-matrix:end -->"


def write_doc(path: Path, text: str) -> None:
    """Write the matrix's part of ``path``, keeping what other generators put there.

    This script's text goes between its own markers; the other ``<!-- NAME:begin -->`` ...
    ``<!-- NAME:end -->`` blocks of the file (e.g. the link-fault matrix) stay as they are.
    """
    block = f"{BEGIN}\n{text.rstrip()}\n{END}\n"
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        start, end = old.index(BEGIN), old.index(END) + len(END)
        path.write_text(old[:start] + block.rstrip("\n") + old[end:])
        return
    kept = [m.group(0) for m in re.finditer(r"<!-- ([\w-]+):begin -->.*?<!-- \1:end -->\n?", old, flags=re.S)]
    path.write_text(block + "".join("\n" + k for k in kept))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", default="IIG,NIG,GGG,None")
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--hang-strategies", default="IIG,None",
                        help="strategies that get the hang fault (each waits out the collective timeout)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "RELIABILITY.md")
    parser.add_argument("--from-json", type=Path, help="render --out again from a previous run's JSON")
    parser.add_argument("--add", action="store_true",
                        help="merge the cells run now into --out's JSON (same fault and strategy: replaced)")
    args = parser.parse_args()
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        write_doc(args.out, render(saved["cells"], saved["wall_s"]))
        return
    unknown = set(args.faults.split(",")) - set(FAULTS)
    if unknown:
        parser.error(f"--faults: unknown {', '.join(sorted(unknown))}; valid: {', '.join(FAULTS)}")
    begin = time.time()
    cells = []
    with tempfile.TemporaryDirectory(prefix="paro-faults-") as tmp:
        root = Path(tmp)
        for strategy in args.strategies.split(","):
            label = "stock" if strategy == "None" else strategy
            rc, wall, events, tail = launch(root / f"{label}-reference", train_args(root / f"{label}-reference", strategy))
            if rc != 0:
                sys.exit(f"{label}: the uninterrupted run failed (exit {rc}):\n{tail}")
            reference = losses(events)
            print(f"{label}: uninterrupted run {wall:.0f} s", flush=True)
            for name in args.faults.split(","):
                if name == "hang" and strategy not in args.hang_strategies.split(","):
                    continue
                if name == "collective" and strategy == "None":
                    continue  # stock torchtitan has no HO-Ring collective
                point, step, ranks = FAULTS[name]
                extra = ("--comm.train_timeout_seconds", str(HANG_TIMEOUT_S)) if name == "hang" else ()
                dump = root / f"{label}-{name}"
                fault = ",".join(f"{point}:{step}:{rank}" for rank in ranks)
                rc, wall, events, tail = launch(dump, train_args(dump, strategy, *extra), fault,
                                                cluster=name in CLUSTER_FAULTS)
                cell = measure(name, label, rc, events, reference)
                cells.append(cell)
                print(f"{label} {name}: {cell['outcome']} ({wall:.0f} s) {json.dumps(cell)}", flush=True)
                if not cell["outcome"].startswith("recovered"):
                    print(tail, flush=True)
    wall = time.time() - begin
    saved_json = args.out.with_suffix(".json")
    if args.add and saved_json.exists():
        saved = json.loads(saved_json.read_text())
        new = {(c["fault"], c["strategy"]) for c in cells}
        kept = [c for c in saved["cells"] if (c["fault"], c["strategy"]) not in new]
        order = {name: i for i, name in enumerate(FAULTS)}
        strategies = list(dict.fromkeys(c["strategy"] for c in kept + cells))
        cells = sorted(kept + cells, key=lambda c: (strategies.index(c["strategy"]), order[c["fault"]]))
        wall += saved["wall_s"]
    write_doc(args.out, render(cells, wall))
    saved_json.write_text(json.dumps({"cells": cells, "wall_s": wall}, indent=1))
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
