"""The end-to-end benchmark's parsing, summaries and report, on synthetic launch output (no cluster)."""

from __future__ import annotations

import argparse
import json

import pytest

from benchmarks import e2e, e2e_report
from benchmarks.e2e_report import (
    ANY_COMM,
    BEGIN,
    END,
    FLOOR_RATE,
    MIB,
    comm_matters,
    failure_reason,
    formula_link_bytes,
    formula_memory,
    generate,
    hidden_table,
    ho_ring_pairs_table,
    ho_ring_table,
    layout,
    pareto_front,
    repeats_table,
    cpu_per_step,
    parse_node_output,
    parse_run,
    render,
    scaling_rows,
    scenario_rows,
    step_times,
    stock_bytes_table,
    summarize,
    targets,
)

PARAMS = 6_163_712


def _node_output(step_s: float, link_per_step: int, losses: list[float], paro: bool, node: int = 0) -> list[str]:
    lines = ["[rank0]:[titan] 2026-01-01 00:00:00,000 - root - INFO - Model llama3 debugmodel size: "
             f"{PARAMS:,} total parameters"]
    if paro:
        lines.append("[rank0]:[titan] 2026-01-01 00:00:00,100 - root - INFO - Applied PaRO GGG (ho_ring) on 2 group(s)")
    for i, loss in enumerate(losses, 1):
        t = 100.0 + i * step_s + (3.0 if i == 1 else 0.0)  # a slow first step, excluded
        tx = i * link_per_step + node
        lines.append(f"[rank0]:[e2e] step={i} t={t:.6f} tx={tx} rx={i * link_per_step} lo={i * 7}")
        lines.append(f"[rank0]:[titan] 2026-01-01 00:00:{i:02d},000 - root - INFO - step: {i:2}  loss: {loss:8.5f}  "
                     f"grad_norm:  1.2087  memory:  0.72GiB(3.05%)  tps: 52  tflops: 0.00  mfu: 0.00%")
        if paro:
            lines.append(f"[rank0]:[titan] 2026-01-01 00:00:{i:02d},001 - root - INFO - step: {i:2}  paro comm/step "
                         "intra: 211.61MiB  inter: 35.27MiB  model state params: 2.94MiB  grads: 2.94MiB  "
                         "optim: 5.88MiB")
    return lines


def _record(config: str, comm: str | None, rate: str, step_s: float, link: int = 0, losses=None, nodes: int = 2,
            ranks: int = 4, accum: int = 4, modes=("sweep",), model: str = "debug") -> dict:
    losses = losses or [8.0, 7.2, 5.4, 4.3, 3.9, 3.5]
    outputs = [_node_output(step_s, link, losses, config not in e2e.STOCK, node) for node in range(nodes)]
    spec = e2e._spec(model, nodes, ranks, accum, config, comm, rate, len(losses), modes[0])
    return {**spec, "modes": list(modes), "status": "ok", **parse_run(outputs), "elapsed_s": 60.0,
            "load_before": 1.0, "load_after": 1.0}


def test_parse_node_output():
    out = parse_node_output(_node_output(2.0, 1000, [8.0, 7.0, 6.0, 5.0], paro=True))
    assert out["params"] == PARAMS and out["applied"] == "GGG"
    assert [s["loss"] for s in out["steps"]] == [8.0, 7.0, 6.0, 5.0]
    assert out["steps"][0]["rss_gib"] == 0.72 and out["steps"][0]["tps"] == 52
    assert out["paro"][4] == {"intra": 211.61, "inter": 35.27, "params": 2.94, "grads": 2.94, "optim": 5.88}
    assert [p[0] for p in out["probes"]] == [1, 2, 3, 4]


def test_parse_strips_colors_and_finds_errors():
    lines = ["\x1b[31mstep:  1  \x1b[32mloss:  8.00000  \x1b[33mgrad_norm:  1.0  \x1b[34mmemory:  0.50GiB(1%)  "
             "\x1b[35mtps: 1,234  tflops: 0.0", "[rank0]: torch.OutOfMemoryError: out of memory on rank 3"]
    out = parse_node_output(lines)
    assert out["steps"][0]["tps"] == 1234
    assert out["errors"] == ["torch.OutOfMemoryError: out of memory on rank 3"]
    peer = ["torch.distributed.DistBackendError: Connection reset by peer"]
    reason = failure_reason([lines, peer], [1, 1], False, 9.0)
    assert reason == "exit node0 1, node1 1: torch.OutOfMemoryError: out of memory on rank 3"
    assert failure_reason([[], []], [None, None], True, 600.0) == "timed out after 600 s"


def test_step_times_and_link_bytes_skip_warmup():
    run = _record("GGG", "ho_ring", "250mbit", 2.0, link=1_000_000)
    assert step_times(run) == pytest.approx([2.0] * 4)  # steps 3..6; the slow first step is out
    row = summarize(run)
    assert row["median"] == pytest.approx(2.0)
    assert row["tokens_s"] == pytest.approx(1 * 128 * 8 * 4 / 2.0)
    assert row["link"] == pytest.approx(1_000_000.5)  # mean of the two nodes (node 1 is 1 byte ahead)
    assert row["memory"] == pytest.approx((2.94 + 2.94 + 5.88) * MIB)


def test_cpu_per_step_from_the_probe():
    probes = [f"[rank0]:[e2e] step={i} t={100 + i}.0 tx=0 rx=0 lo=0 cpu={10 + 0.5 * i * i:.6f}" for i in range(1, 6)]
    run = parse_run([probes])
    # Steps 3, 4, 5 spent 2.5, 3.5 and 4.5 CPU seconds; steps 1 and 2 are warm-up.
    assert cpu_per_step(run) == pytest.approx(3.5)
    assert cpu_per_step(parse_run([[p.rsplit(" cpu=", 1)[0] for p in probes]])) is None  # an older probe line


def test_formulas_per_node_link_and_memory():
    run = {"config": "GGG", "nodes": 2, "ranks": 4, "accum": 4, "params": PARAMS}
    # GGG, A=4: 8 gathers + 4 reduce-scatters per step, each rank sends (g-1)/n of the model per collective
    # across groups; m ranks per node: (g-1)/g * 4 bytes * PARAMS * 12 per node link.
    assert formula_link_bytes(run) == pytest.approx(0.5 * 4 * PARAMS * 12)
    assert formula_memory(run) == pytest.approx(PARAMS * (4 + 4 + 8) / 8)
    assert formula_memory({**run, "config": "fsdp"}) == formula_memory(run)  # stock FSDP shown as GGG
    assert formula_link_bytes({**run, "config": "III"}) == pytest.approx(0.5 * 2 * 4 * PARAMS / 4 * 4)


def test_layouts_and_comm():
    assert layout("fsdp", 2, 4) == (1, 8, "None")
    assert layout("hsdp", 2, 4) == (2, 4, "None")
    assert layout("ddp", 4, 2) == (8, 1, "None")
    assert layout("zero3", 2, 4) == (2, 4, "GGG")
    assert comm_matters("GGG") and comm_matters("NIG") and not comm_matters("IIG") and not comm_matters("III")


def test_scenario_rows_floor_fsdp_and_loss():
    runs = [_record("fsdp", None, FLOOR_RATE, 1.0), _record("fsdp", None, "250mbit", 8.0),
            _record("GGG", "ho_ring", FLOOR_RATE, 1.0), _record("GGG", "ho_ring", "250mbit", 4.0),
            _record("IIG", ANY_COMM, FLOOR_RATE, 1.0),
            _record("IIG", ANY_COMM, "250mbit", 1.02, losses=[8.0, 7.2, 5.4, 4.3, 3.9, 3.5004])]
    rows = scenario_rows(runs, "debug", 2, 4, 4, "250mbit")
    # Stock first, then the strategies in the README's order (by optimizer granularity).
    assert [r["label"] for r in rows] == ["stock FSDP", "PaRO IIG", "PaRO GGG ho_ring"]
    assert rows[2]["vs_fsdp"] == pytest.approx(2.0) and rows[1]["vs_floor"] == pytest.approx(1.02)
    assert rows[1]["loss_diff"] == pytest.approx(4e-4, abs=1e-9)
    # A run of another step count (another learning-rate schedule) is not compared.
    seven = [8.0, 7.3, 5.6, 4.5, 4.0, 3.6, 3.4]
    longer = [*runs[:4], _record("IIG", ANY_COMM, FLOOR_RATE, 1.0, losses=seven),
              _record("IIG", ANY_COMM, "250mbit", 1.02, losses=seven)]
    assert "loss_diff" not in scenario_rows(longer, "debug", 2, 4, 4, "250mbit")[1]
    lines = generate({"runs": runs, "settings": {"config_file": "x.toml", "seq_len": 128, "local_batch": 1},
                      "command": "python -m benchmarks.e2e --quick", "created": "now", "subset": "--quick subset",
                      "cpus": 2, "elapsed_s": 60.0}, {})
    text = "\n".join(lines)
    assert "| debug | best PaRO (PaRO IIG) tokens/s vs stock FSDP | 7.84x | >= 3.5x | met |" in text
    assert "| debug | PaRO GGG tokens/s vs stock FSDP | 2.00x | >= 1.6x | met |" in text
    assert "| 57M | best PaRO tokens/s vs stock HSDP | not run | >= 1.3x | not run |" in text
    assert "HO-Ring vs `paro_comm = \"default\"`: not measured" in text
    assert "### llama3 debug (debugmodel), 2 nodes x 4 ranks, 250mbit, A = 4, 6 steps per run" in text


def test_stock_bytes_table_one_column_per_model_topology_and_accumulation():
    runs = [_record("fsdp", None, "250mbit", 8.0, link=10 * MIB), _record("fsdp", None, "1gbit", 4.0, link=11 * MIB),
            _record("hsdp", None, "250mbit", 8.0, link=10 * MIB, accum=1),
            _record("GGG", "ho_ring", "250mbit", 4.0, link=MIB)]
    fsdp = formula_link_bytes(_record("fsdp", None, "250mbit", 1.0))
    hsdp = formula_link_bytes(_record("hsdp", None, "250mbit", 1.0, accum=1))
    table_lines = stock_bytes_table(runs)
    assert table_lines[0] == "| stock run | formula | debug 2x4 A=4 | debug 2x4 A=1 |"
    # Link rates fold into a range; a config not run in a column reads "-"; PaRO rows are not stock.
    assert table_lines[2] == (f"| stock FSDP | GGG | {10 * MIB / fsdp:.2f}-{11 * MIB / fsdp:.2f}x | - |")
    assert table_lines[3] == f"| stock HSDP | III | - | {10 * MIB / hsdp:.2f}x |"
    assert len(table_lines) == 4 and stock_bytes_table(runs[3:]) == []


def test_hidden_share_and_bound_from_floor_and_wire_time():
    # 2 MiB per node per step at 250mbit is 0.0671 s on the wire.
    link, rate = 2 * MIB, "250mbit"
    wire = link * 8 / 250e6
    runs = [_record("hsdp", None, FLOOR_RATE, 1.0), _record("hsdp", None, rate, 1.0 + wire / 2, link=link),
            _record("NIG", ANY_COMM, FLOOR_RATE, 1.0), _record("NIG", ANY_COMM, rate, 1.0 + wire / 4, link=link),
            _record("NNG", ANY_COMM, rate, 0.5, link=link)]  # no floor: no hidden share
    rows = {r["config"]: r for r in scenario_rows(runs, "debug", 2, 4, 4, rate)}
    assert rows["hsdp"]["wire"] == pytest.approx(wire) and rows["hsdp"]["hidden"] == pytest.approx(0.5, abs=1e-4)
    assert rows["NIG"]["hidden"] == pytest.approx(0.75, abs=1e-4)
    assert rows["NIG"]["vs_bound"] == pytest.approx(1 + wire / 4)
    assert "hidden" not in rows["NNG"]
    # The best PaRO run of the scenario (NNG, fastest) has no floor: the scenario has no row.
    assert hidden_table(runs) == []
    lines = hidden_table(runs[:4])
    assert lines[2] == (f"| debug 2x4 250mbit A=4 | {wire:.2f} | PaRO NIG: 0.75 / {1 + wire / 4:.2f}x "
                        f"| - | 0.50 / {1 + wire / 2:.2f}x | - |")
    # A step shorter than its wire time is bounded by the wire time.
    slow_link = [_record("NIG", ANY_COMM, FLOOR_RATE, 0.01), _record("NIG", ANY_COMM, rate, 2 * wire, link=link)]
    assert scenario_rows(slow_link, "debug", 2, 4, 4, rate)[0]["vs_bound"] == pytest.approx(2.0, abs=1e-4)


def test_ho_ring_table_per_rate_with_floors_and_losses():
    def pair(config: str, rate: str, ho_ring: float, default: float, accum: int = 4) -> list[dict]:
        return [_record(config, "ho_ring", rate, ho_ring, accum=accum),
                _record(config, "default", rate, default, accum=accum)]

    runs = [*pair("GGG", "250mbit", 1.0, 1.1), *pair("IIG", "250mbit", 1.0, 0.95), *pair("NIG", "250mbit", 1.0, 1.3),
            *pair("GGG", FLOOR_RATE, 1.0, 0.9), *pair("GGG", "1gbit", 1.0, 1.2, accum=1),
            _record("NNG", "ho_ring", "1gbit", 1.0)]  # no two-phase run: no pair
    lines = ho_ring_table(runs)
    assert lines[0] == ("| model, topology, A | 250mbit: median, pairs HO-Ring loses | 1gbit: median, pairs HO-Ring "
                        "loses | 20gbit (floor): median, pairs HO-Ring loses |")
    assert lines[2] == "| debug 2x4 A=4 | +10.0%, 1 of 3 | - | -10.0%, 1 of 1 |"
    assert lines[3] == "| debug 2x4 A=1 | - | +20.0%, 0 of 1 | - |"
    assert len(lines) == 4 and ho_ring_table(runs[-1:]) == []


def test_failed_and_unfit_rows_say_why():
    runs = [_record("fsdp", None, "250mbit", 8.0),
            {**e2e._spec("debug", 2, 4, 4, "NNN", ANY_COMM, "250mbit", 6, "sweep"), "status": "not run",
             "reason": "does not fit: about 30.0 GiB for 8 ranks"},
            {**e2e._spec("debug", 2, 4, 4, "GGG", "default", "250mbit", 6, "sweep"), "status": "failed",
             "reason": "exit node0 1: ValueError: boom", "steps": [], "probes": []}]
    text = "\n".join(generate({"runs": runs, "settings": {"config_file": "x", "seq_len": 128, "local_batch": 1},
                               "command": "c", "created": "now", "cpus": 2, "elapsed_s": 1.0}, {}))
    assert "| PaRO NNN | not run: does not fit: about 30.0 GiB for 8 ranks |" in text
    assert "| PaRO GGG default | failed: exit node0 1: ValueError: boom |" in text


def test_scaling_rows():
    runs = []
    for nodes, slow in ((1, 1.0), (2, 1.25), (4, 2.0)):
        runs.append(_record("IIG", ANY_COMM, FLOOR_RATE, 1.0, nodes=nodes, ranks=2, modes=("scaling",)))
        if nodes > 1:
            runs.append(_record("IIG", ANY_COMM, "250mbit", slow, nodes=nodes, ranks=2, modes=("scaling",)))
    (row,) = scaling_rows(runs)
    assert {n: round(c["efficiency"], 3) for n, c in row["nodes"].items()} == {1: 1.0, 2: 0.8, 4: 0.5}
    assert {n: c["bound"] for n, c in row["nodes"].items()} == {1: 1.0, 2: 1.0, 4: 1.0}  # no link bytes
    runs += [_record("fsdp", None, FLOOR_RATE, 1.0, nodes=4, ranks=2, modes=("scaling",)),
             _record("fsdp", None, "250mbit", 4.0, nodes=4, ranks=2, modes=("scaling",))]
    (line,) = [t for t in targets(runs) if "scaling efficiency" in t]
    assert line == ("| debug | PaRO IIG scaling efficiency at 4 nodes, 250mbit (stock FSDP: 0.25) | 0.50 (bound 1.00) "
                    "| >= 0.9 | missed |")
    # Models in the sweep's order (debug first), whatever their names sort to.
    runs += [_record("IIG", ANY_COMM, rate, 1.0, nodes=2, ranks=2, modes=("scaling",), model="57M")
             for rate in (FLOOR_RATE, "250mbit")]
    assert [r["model"] for r in scaling_rows(runs)] == ["debug", "debug", "57M"]


def test_overlap_bound():
    """One second of wire per step at 250mbit: traffic once per step (IIG) hides behind floor / A
    only, traffic per micro-batch (GGG; stock HSDP, though III's formula is once per step) behind
    the whole floor."""
    second = 250_000_000 // 8
    for config, comm, bound in (("IIG", ANY_COMM, 1.75), ("fsdp", None, 1.0), ("GGG", "ho_ring", 1.0),
                                ("hsdp", None, 1.0)):
        run = _record(config, comm, "250mbit", 1.8, link=second)
        assert e2e_report.overlap_bound(run, 1.0) == pytest.approx(bound), config
        assert e2e_report.overlap_bound(run, 0.5) == pytest.approx(1.5 - 0.5 / (4 if config == "IIG" else 1))
    floor = _record("IIG", ANY_COMM, FLOOR_RATE, 1.0, link=second)
    assert e2e_report.overlap_bound(floor, 1.0) == 1.0
    rows = scaling_rows([_record("IIG", ANY_COMM, FLOOR_RATE, 1.0, nodes=2, ranks=2, modes=("scaling",)),
                         _record("IIG", ANY_COMM, "250mbit", 2.0, link=second, nodes=2, ranks=2,
                                 modes=("scaling",))])
    assert rows[0]["nodes"][2]["bound"] == pytest.approx(1 / 1.75)


def test_pareto_front():
    assert pareto_front([(10, 100), (5, 50), (20, 90), (5, 40), (30, 200)]) == [(5, 50), (10, 100), (30, 200)]


def test_render_keeps_prose(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [_record("fsdp", None, FLOOR_RATE, 1.0), _record("fsdp", None, "250mbit", 8.0),
            _record("GGG", "ho_ring", FLOOR_RATE, 1.0), _record("GGG", "ho_ring", "250mbit", 4.0)]
    raw = {"runs": runs, "settings": {"config_file": "x", "seq_len": 128, "local_batch": 1},
           "command": "c", "created": "now", "cpus": 2, "elapsed_s": 1.0}
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(f"# Title\n\nprose before\n\n{BEGIN}\nold\n{END}\n\nprose after\n")
    render(json.loads(json.dumps(raw)), doc)
    text = doc.read_text()
    assert text.startswith("# Title\n\nprose before") and text.endswith("prose after\n") and "\nold\n" not in text
    # top-down: the headline (stock FSDP 8 s, GGG 4 s: 2.00x), the targets, the detail, how it was measured
    assert text.index("## Headline") < text.index("## Targets") < text.index("## Runs") < text.index(
        "## How these were measured") < text.index("## Launches")
    assert "| debug | 2x4 | 250mbit | 4 | PaRO GGG ho_ring | 2.00x | - | - |" in text
    assert (tmp_path / "benchmarks" / "e2e_pareto.png").stat().st_size > 0
    assert (tmp_path / "benchmarks" / "e2e_loss.png").stat().st_size > 0


def test_plans():
    args = e2e._resolve(e2e._parser().parse_args(["--quick"]))
    plan = e2e._merge_modes(e2e.sweep_plan(args))
    assert [(s["config"], s["comm"], s["rate"]) for s in plan] == [
        (c, m, r) for c, m in (("fsdp", None), ("hsdp", None), ("GGG", "ho_ring"), ("IIG", ANY_COMM),
                               ("NIG", "ho_ring")) for r in (FLOOR_RATE, "250mbit")]
    full = e2e._resolve(e2e._parser().parse_args([]))
    sweep = e2e._merge_modes(e2e.sweep_plan(full))
    # 2 models x 2 topologies x 2 A x (3 stock + 7 strategies without global collectives + 7 x 2 comms) x 3 rates
    assert len(sweep) == 2 * 2 * 2 * (3 + 7 + 7 * 2) * 3
    both = e2e._merge_modes(sweep + e2e.scaling_plan(full, []))
    shared = [s for s in both if s["modes"] == ["scaling", "sweep"]]
    assert shared and all(s["nodes"] == 4 and s["ranks"] == 2 and s["accum"] == 4 for s in shared)
    argv = e2e.torchtitan_args(plan[5], "/tmp/x")
    assert argv[argv.index("--parallelism.paro_strategy") + 1] == "GGG"
    assert argv[argv.index("--parallelism.paro_comm") + 1] == "ho_ring"
    assert argv[argv.index("--training.global_batch_size") + 1] == "32"
    assert "--parallelism.paro_ho_ring_chunks" not in argv  # the sweep keeps HO-Ring's default depth
    deep = e2e.torchtitan_args({**plan[5], "ho_ring_chunks": 4}, "/tmp/x")
    assert deep[deep.index("--parallelism.paro_ho_ring_chunks") + 1] == "4"
    stock = e2e.torchtitan_args(plan[0], "/tmp/x")
    assert "--parallelism.paro_comm" not in stock
    assert stock[stock.index("--parallelism.data_parallel_shard_degree") + 1] == "8"
    # Each model's own step count unless --steps says otherwise, so the full sweep reproduces the doc's rows.
    assert {(s["model"], s["steps_requested"]) for s in sweep} == set(e2e.DEFAULT_STEPS.items())
    assert {s["steps_requested"] for s in e2e.sweep_plan(e2e._resolve(e2e._parser().parse_args(["--steps", "5"])))} \
        == {5}


def test_a_remeasured_run_keeps_the_modes_of_the_run_it_replaces(tmp_path, monkeypatch, capsys):
    """Scaling runs re-measured without --resume still count for the sweep they were part of."""
    raw, doc = tmp_path / "e2e.json", tmp_path / "BENCHMARKS.md"
    argv = ["--merge", "--models", "debug", "--topologies", "4x2", "--rates", "250mbit", "--accum", "4",
            "--configs", "NNG", "--comms", "ho_ring", "--raw", str(raw), "--doc", str(doc), "--logs", str(tmp_path)]
    args = e2e._resolve(e2e._parser().parse_args(["--only", "sweep", *argv]))
    keys = [e2e.run_key(s) for s in e2e.sweep_plan(args)]
    raw.write_text(json.dumps({"runs": [{**s, "status": "ok", "modes": ["sweep"]} for s in e2e.sweep_plan(args)]}))
    monkeypatch.setattr(e2e, "launch", lambda spec, *_: {**spec, "status": "failed", "reason": "fake"})
    monkeypatch.setattr(e2e, "render", lambda *_: None)
    assert e2e.drive(e2e._resolve(e2e._parser().parse_args(["--only", "scaling", "--scaling-config", "NNG:ho_ring",
                                                            *argv]))) == 1
    runs = {e2e.run_key(r): r for r in json.loads(raw.read_text())["runs"]}
    assert all(runs[k]["modes"] == ["scaling", "sweep"] and runs[k]["reason"] == "fake" for k in keys)
    # Each launch says what it runs and about how long is left.
    first = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("[e2e] run 1/"))
    assert " A=4 " in first and "of the scaling runs left) ..." in first, first


def test_list_with_resume_leaves_out_saved_runs(tmp_path, capsys):
    raw = tmp_path / "e2e.json"
    argv = ["--only", "sweep", "--models", "debug", "--topologies", "4x2", "--rates", "250mbit", "--accum", "4",
            "--configs", "NNG,NIG", "--comms", "ho_ring", "--raw", str(raw), "--list"]
    plan = e2e.sweep_plan(e2e._resolve(e2e._parser().parse_args(argv)))
    nng = [{**s, "status": "ok"} for s in plan if s["config"] == "NNG"]
    raw.write_text(json.dumps({"runs": nng + [{**s, "status": "failed"} for s in plan if s["config"] == "NIG"]}))
    assert e2e.list_plan(e2e._resolve(e2e._parser().parse_args(argv))) == 0
    assert "4 launches" in capsys.readouterr().out
    assert e2e.list_plan(e2e._resolve(e2e._parser().parse_args([*argv, "--resume"]))) == 0
    listed = capsys.readouterr().out
    assert "2 launches" in listed and "NNG" not in listed and listed.count("PaRO NIG") == 2


def test_estimate_from_the_same_run_else_the_configs_ratio_to_its_formula(monkeypatch):
    monkeypatch.setattr(e2e, "model_params", lambda model: PARAMS)
    formula = formula_link_bytes(_record("hsdp", None, "250mbit", 1.0))
    saved = [_record("hsdp", None, FLOOR_RATE, 2.0), _record("hsdp", None, "1gbit", 3.0, link=int(4 * formula))]
    spec = e2e._spec("debug", 2, 4, 4, "hsdp", None, "250mbit", 6, "sweep")
    startup = e2e.STARTUP_PER_RANK_S * 8
    # Its own floor's step (2 s) and the bytes it sent at 1gbit, now at 250mbit.
    link_s = 4 * formula * 8 / 250e6
    assert e2e.estimate_seconds(spec, saved) == pytest.approx(startup + 6 * (2.0 + link_s), rel=1e-3)
    # The 57M run has neither: the debug run's 4x over the formula carries over to the 57M formula.
    big = e2e._spec("57M", 2, 4, 4, "hsdp", None, "250mbit", 6, "sweep")
    monkeypatch.setattr(e2e, "model_params", lambda model: PARAMS if model == "debug" else 10 * PARAMS)
    compute = e2e.estimate_seconds({**big, "rate": FLOOR_RATE}, saved) - startup
    big_formula = formula_link_bytes({**big, "params": 10 * PARAMS})
    assert big_formula == pytest.approx(10 * formula)
    assert e2e.estimate_seconds(big, saved) == pytest.approx(startup + compute + 6 * 4 * big_formula * 8 / 250e6,
                                                             rel=1e-3)


def test_torchrun_root_cause_names_the_rank():
    node1 = ["Root Cause (first observed failure):", "[0]:", "  time      : 2026-01-01_00:00:00",
             "  rank      : 6 (local_rank: 2)", "  exitcode  : -6 (pid: 30786)  (SIGABRT)", "  error_file: <N/A>"]
    assert failure_reason([[], node1], [-9, 1], False, 80.0) == "exit node0 -9, node1 1: rank 6 exit -6 (SIGABRT)"


def test_overlap_phases_parse_from_node_output():
    from benchmarks import overlap

    def line(step, node, wait_p):
        report = {"step": step, "total": 3.0, "pre": 0.1, "fb": [1.0, 0.5], "clip": 0.2, "optim": 0.1,
                  "post": 0.4, "wait_g": 0.15, "wait_p": wait_p,
                  "tx": {w: step * 10**6 for w in overlap.WINDOWS}, "window": {w: 0.5 for w in overlap.WINDOWS}}
        return f"[node{node}] [rank0]:[overlap] {json.dumps(report)}"

    log = "\n".join(line(s, n, 0.1 * s) for s in range(1, 6) for n in (0, 1))
    phases = overlap.parse(log, warmup=2)  # steps 3-5 on both nodes
    assert phases["wait_p"] == pytest.approx(0.4) and phases["fb"] == pytest.approx(1.5)
    assert phases["fb1"] == pytest.approx(1.0) and phases["post"] == pytest.approx(0.4)
    assert phases["tx"]["clip"] == 4 * 10**6 and phases["window"]["last_fb"] == 0.5
    assert overlap.parse("no reports", warmup=2) == {}
    # 4 MB in 0.5 s on a 128 mbit (16 MB/s) link: busy half the window; floors get no link row.
    rows = [{"label": "IIG", "rate": r, "status": "ok", "step_times": [3.0], "phases": phases}
            for r in ("128mbit", "20gbit")]
    table = overlap.render(rows, "cmd").split("| run | link | first fb")[1]
    assert "| IIG | 128mbit | 3.81 (50%) |" in table and "20gbit" not in table


def test_overlap_link_bytes_between_samples():
    from benchmarks.overlap import _sent

    samples = [(0.0, 100), (1.0, 150), (2.0, 400)]
    assert _sent(samples, 0.5, 1.5) == 50  # the last sample at or before each end
    assert _sent(samples, 1.0, 2.0) == 250 and _sent(samples, 2.5, 3.0) == 0
    assert _sent(samples, -1.0, 0.5) == 0


def test_zero_tax_table_per_accumulation():
    from benchmarks import zero_tax

    def run(median: float, cpu: float | None, note: str = "") -> dict:
        return {"median_s": median, "cpu_s": cpu, "note": note}

    results = {(1, "fsdp"): [run(0.36, 0.2)], (1, "GGG"): [run(0.32, 0.18)],
               (1, "ddp"): [run(0.22, 0.1), run(0.21, 0.11)], (1, "NNN"): [run(0.29, 0.14, "exited 1 after its last step")],
               (4, "fsdp"): [run(1.2, None)], (4, "GGG"): [run(1.1, 0.5)], (4, "ddp"): [run(0.6, 0.3)],
               (4, "NNN"): [run(0.6, 0.3)], (1, "NNN@abc1234"): [run(0.31, 0.15), run(0.30, 0.15)],
               (4, "NNN@abc1234"): [run(0.66, 0.33)]}
    rows = zero_tax.compared([("fsdp", "GGG"), ("ddp", "NNN")], None)
    text = zero_tax.render(results, "python -m benchmarks.zero_tax", 4, [1, 4], rows)
    assert text.startswith(zero_tax.BEGIN) and text.endswith(zero_tax.END)
    assert "Generated by `python -m benchmarks.zero_tax`" in text
    # The best run of each side is compared, and its CPU time is the one shown.
    assert ("| 1 | PaRO NNN vs stock DDP | 0.210 (0.220, 0.210) | 0.290 (0.290 (exited 1 after its last step)) "
            "| 0.724x | 0.110 / 0.140 |") in text
    assert "| 4 | PaRO GGG vs stock FSDP | 1.200 (1.200) | 1.100 (1.100) | 1.091x | - / 0.500 |" in text
    assert "at abc1234" not in text
    # With a baseline revision each PaRO run is also set against the same configuration there.
    rows = zero_tax.compared([("ddp", "NNN")], "abc1234")
    assert rows == [("ddp", "NNN"), ("NNN@abc1234", "NNN")]
    text = zero_tax.render(results, "python -m benchmarks.zero_tax --baseline abc1234", 4, [1, 4], rows)
    assert "| 1 | PaRO NNN vs PaRO NNN at abc1234 | 0.300 (0.310, 0.300) | 0.290 (0.290 (exited 1 after its last step)) " \
           "| 1.034x | 0.150 / 0.140 |" in text
    assert "| 4 | PaRO NNN vs PaRO NNN at abc1234 | 0.660 (0.660) | 0.600 (0.600) | 1.100x | 0.330 / 0.300 |" in text
    assert "GGG" not in text


def test_zero_tax_refuses_unknown_pairs_and_revisions():
    from benchmarks import zero_tax

    assert zero_tax._pair("ddp:NNN") == ("ddp", "NNN")
    with pytest.raises(argparse.ArgumentTypeError, match="'ddp:GGG' is not a pair this benchmark runs; valid: "
                                                         "fsdp:GGG, ddp:NNN"):
        zero_tax._pair("ddp:GGG")
    with pytest.raises(SystemExit, match="--baseline 'no-such-rev': not a commit of this repository"):
        with zero_tax.checkout("no-such-rev"):
            pass


def test_repeats_table_sets_each_repeat_beside_its_run_in_launch_order():
    run = {**_record("IGG", ANY_COMM, "250mbit", 2.0), "created": "2026-11-26 20:00:00"}
    earlier = {**_record("IGG", "default", FLOOR_RATE, 1.0), "created": "2026-11-26 08:00:00"}
    runs = [run, {**_record("IGG", ANY_COMM, FLOOR_RATE, 1.1), "created": "2026-11-26 09:00:00"}]
    repeats = [{**_record("IGG", "default", "250mbit", 2.5), "created": "2026-11-27 03:00:00"}, earlier,
               {**_record("ING", "default", "250mbit", 1.0), "created": "2026-11-27 03:00:00"},  # no run: left out
               {**run, "status": "failed", "comm": "default"}]
    lines = repeats_table(runs, repeats)
    assert lines[0] == "2 runs launched twice; |difference| median 14.5%, largest 20.0%."
    # Rates in order; the first launch is the earlier one, whichever list holds it.
    assert lines[4:] == ["| debug 2x4 A=4 | IGG | 250mbit | 11-26 20:00, 2.00 | 11-27 03:00, 2.50 | -20.0% |",
                         "| debug 2x4 A=4 | IGG | 20gbit (floor) | 11-26 08:00, 1.00 | 11-26 09:00, 1.10 | -9.1% |"]
    assert repeats_table(runs, []) == []


def test_ho_ring_pairs_table_one_row_per_strategy():
    runs = [_record("GGG", "ho_ring", "250mbit", 1.0), _record("GGG", "default", "250mbit", 1.25),
            _record("NIG", "ho_ring", FLOOR_RATE, 1.0), _record("NIG", "default", FLOOR_RATE, 0.8),
            _record("NIG", "ho_ring", "250mbit", 2.0), _record("NIG", "default", "250mbit", 2.2),
            _record("GGG", "default", "250mbit", 3.0, accum=1),  # no HO-Ring run: no pair
            _record("NNG", "ho_ring", "1gbit", 1.0, model="57M")]
    lines = ho_ring_pairs_table(runs)
    assert lines[0] == ("| model, topology, A | strategy | 250mbit: HO-Ring s / two-phase s, gain "
                        "| 20gbit (floor): HO-Ring s / two-phase s, gain |")
    # Strategies in the README's order (NIG before GGG), a rate without a pair reads "-".
    assert lines[2:] == ["| debug 2x4 A=4 | NIG | 2.00 / 2.20, +10.0% | 1.00 / 0.80, -20.0% |",
                         "| debug 2x4 A=4 | GGG | 1.00 / 1.25, +25.0% | - |"]
    assert ho_ring_pairs_table(runs[-2:]) == []


def test_ho_ring_depth_table():
    from benchmarks import ho_ring_depth

    def run(comm, chunks, rate, step_s):
        return {**_record("GGG", comm, rate, step_s, model="57M"), "ho_ring_chunks": chunks}

    runs = [run(c, k, rate, s) for rate, times in (("250mbit", (20.0, 16.0, 17.0)), (FLOOR_RATE, (8.0, 10.0, 16.0)))
            for (c, k), s in zip(ho_ring_depth.variants([4, 16]), times)]
    runs[-1] = {**runs[-1], "status": "failed", "reason": "timeout"}
    lines = ho_ring_depth.render(runs, ["cmd"]).splitlines()
    assert lines[0] == ho_ring_depth.BEGIN and lines[-1] == ho_ring_depth.END
    assert lines[3] == "| model, topology, A | strategy | link | two-phase | HO-Ring, 4 chunks | HO-Ring, 16 chunks |"
    rows = lines[5:-1]
    assert rows[0].startswith("| 57M 2x4 A=4 | GGG | 250mbit | 20.00 s (20.00-20.00) | 16.00 s (16.00-16.00), +25.0% |")
    assert rows[0].endswith("| 17.00 s (17.00-17.00), +17.6% |")
    assert rows[1].startswith(f"| 57M 2x4 A=4 | GGG | {FLOOR_RATE} (floor) | 8.00 s")
    assert "10.00 s (10.00-10.00), -20.0%" in rows[1] and rows[1].endswith("| failed: timeout |")


def test_bucket_cap_table():
    from benchmarks import bucket_cap

    def run(config, cap, step_s, rate="1gbit"):
        return {**_record(config, None if config in e2e.STOCK else "default", rate, step_s, accum=1),
                "bucket_cap_mb": cap}

    runs = [run("ddp", None, 1.2), run("NIG", 0.0, 1.0), run("NIG", 25.0, 0.8), run("NNN", 0.0, 1.5),
            {**run("NNN", 25.0, 1.0), "status": "failed", "reason": "timeout"}, run("NNN", 8.0, 1.6, rate="250mbit")]
    lines = bucket_cap.render(runs, ["cmd"]).splitlines()
    assert lines[0] == bucket_cap.BEGIN and lines[-1] == bucket_cap.END
    assert lines[3] == "| scenario | link | strategy | stock DDP | a unit per block | 8 MiB | 25 MiB | fastest |"
    assert lines[5:-1] == [
        "| debug 2x4 A=1 | 1gbit | NIG | 1.200 s | 1.000 s (1.000-1.000), 1.200x | - "
        "| 0.800 s (0.800-0.800), 1.500x | 25 MiB |",
        "| debug 2x4 A=1 | 1gbit | NNN | 1.200 s | 1.500 s (1.500-1.500), 0.800x | - | failed: timeout "
        "| a unit per block |",
        "| debug 2x4 A=1 | 250mbit | NNN | - | - | 1.600 s (1.600-1.600) | - | 8 MiB |",
    ]


@pytest.mark.parametrize("argv,message", [
    (["--configs", "GGG"], "--configs GGG: only strategies with P = N"),
    (["--configs", "ddp"], "--configs ddp: only strategies with P = N"),
    (["--topologies", "2x4,1x4"], "argument --topologies: '1x4': expected NODESxRANKS"),
    (["--caps", "0,-1"], "argument --caps: '-1': a cap is a number of MiB >= 0"),
])
def test_bucket_cap_refuses_what_it_cannot_measure(tmp_path, capsys, argv, message):
    from benchmarks import bucket_cap

    with pytest.raises(SystemExit) as exit_info:
        bucket_cap.main([*argv, "--out", str(tmp_path / "caps.md")])
    assert message in str(exit_info.value) + capsys.readouterr().err
    assert not (tmp_path / "caps.md").exists()


def test_bucket_cap_reaches_the_trainer():
    spec = {**e2e._spec("debug", 2, 4, 1, "NIG", "default", "1gbit", 8, "sweep"), "bucket_cap_mb": 8.0}
    args = e2e.torchtitan_args(spec, "/tmp/dump")
    assert args[args.index("--parallelism.paro_bucket_cap_mb") + 1] == "8.0"
    assert "--parallelism.paro_bucket_cap_mb" not in e2e.torchtitan_args({**spec, "bucket_cap_mb": None}, "/tmp/d")


@pytest.mark.parametrize("argv,message", [
    (["--configs", "IGG"], "--configs IGG: no global collective, so HO-Ring's depth changes nothing; give strategies "
                           "with one (NNN, NNG, NIG, NGG, GNG, GIG, GGG)"),
    (["--configs", "fsdp"], "--configs fsdp: stock runs have no HO-Ring"),
    (["--depths", "4,0"], "--depths=0 is invalid: HO-Ring's pipeline depth is a positive int (default 16)"),
    (["--topology", "2x1"], "--topology '2x1': expected NODESxRANKS, both at least 2"),
])
def test_ho_ring_depth_refuses_what_it_cannot_measure(tmp_path, argv, message):
    from benchmarks import ho_ring_depth

    with pytest.raises(SystemExit) as exit_info:
        ho_ring_depth.main([*argv, "--out", str(tmp_path / "depth.md")])
    assert message in str(exit_info.value)
    assert not (tmp_path / "depth.md").exists()
