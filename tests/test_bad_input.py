"""Bad input is refused at start-up, good input starts: property-based over the PaRO fields of a
torchtitan job (with the parallelism degrees and the world size) and over ``paro plan``'s flags.

Each example draws values that are valid or not; an oracle written from the documented rules
(``docs/torchtitan.md``, ``paro plan --help``) says which violations it has. With none, the
settings / the plan must come out; with some, the error must name one of the violated fields,
with its value, and say what is valid. Everything runs without a process group.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

from paro_fsdp.__main__ import main as paro_main
from paro_fsdp.planner import Calibration, LinkFit, write_calibration
from paro_fsdp.strategy import ParoStrategy
from torchtitan_patch.settings import ParoConfigError, ParoSettings, paro_settings

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "train_configs" / "llama3_debug_paro.toml"
EXAMPLES = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# What a message must contain to say what is valid.
SAYS_WHAT_IS_VALID = re.compile(
    r"valid|must|set it|set the|use |expected|needs|supports|point it|did you mean|give|choose from")

_BASE: list[Any] = []


def _base_config() -> Any:
    """The debug TOML parsed once (parsing takes about a second); examples change a deep copy."""
    if not _BASE:
        from torchtitan.config import ConfigManager

        _BASE.append(ConfigManager().parse_args(["--job.config_file", str(CONFIG)]))
    return _BASE[0]


# PaRO fields ----------------------------------------------------------------------------------

CODES = [s.code for s in ParoStrategy.all_valid()]
ALIASES = {"ddp": "NNN", "zero1": "NNG", "zero2": "NGG", "zero3": "GGG", "fsdp": "GGG", "mics": "III", "hsdp": "III"}
UNSET = (None, "", "None", "none")  # unset: stock torchtitan (also with surrounding spaces)


def mostly(valid: st.SearchStrategy[Any], invalid: st.SearchStrategy[Any], odds: int = 6) -> st.SearchStrategy[Any]:
    """``valid`` values, and one time in ``odds`` an ``invalid`` one, so combinations of both are common."""
    # sampled_from draws its indices about evenly (integers() favours 0).
    return st.sampled_from(range(odds)).flatmap(lambda i: invalid if i == odds // 2 else valid)


def _case(text: str, lower: bool) -> str:
    return text.lower() if lower else text


strategies_field = st.sampled_from(range(10)).flatmap(lambda i: [
    st.sampled_from([*UNSET, " ", " None "]),
    st.one_of(st.sampled_from(["GIN", "NGI", "XYZ", "II", "IIGG", "zero4", "NONE", 3, True, 1.5, ["IIG"]]),
              st.text(alphabet="NIGnig auto", max_size=5)),
][i] if i < 2 else st.builds(_case, st.sampled_from(CODES + list(ALIASES) + ["auto", "AUTO", " iig "]), st.booleans()))
comm_field = mostly(st.sampled_from(["default", "ho_ring", "auto"]),
                    st.one_of(st.sampled_from(["ring", "HO_RING", "", " default", 3, None]), st.text(max_size=4)))
chunks_field = mostly(st.sampled_from([0, 0, 1, 4, 16, 64]), st.sampled_from([-1, -16, True, 2.5, "4", None]))
memory_field = mostly(st.one_of(st.just(0), st.integers(0, 200), st.floats(0, 1e6)),
                      st.one_of(st.floats(max_value=-1e-300), st.sampled_from([math.nan, math.inf, -math.inf, True,
                                                                             "8", None, -1])))
degree = mostly(st.integers(1, 4), st.one_of(st.integers(-2, 0), st.sampled_from([True, 2.0, "2", None])), odds=2)
schedule_field = st.sampled_from(["1F1B", "1F1B", "GPipe", "Interleaved1F1B", "ZBVZeroBubble", "DualPipeV"])
CALIBRATIONS = ["empty", "match", "mismatch", "missing", "directory", "not_json", "wrong_version", "bad_rate",
                "bad_kind", "not_a_string"]
calibration_kinds = mostly(st.sampled_from(["empty", "match"]), st.sampled_from(CALIBRATIONS[2:]), odds=3)


@st.composite
def layouts(draw: Any) -> dict[str, Any]:
    """Degrees and a world size: mostly a consistent layout, then perhaps one field changed."""
    g, m, tp, pp = (draw(st.integers(1, 4)) for _ in range(4))
    layout = {"data_parallel_replicate_degree": g, "data_parallel_shard_degree": m, "tensor_parallel_degree": tp,
              "pipeline_parallel_degree": pp, "context_parallel_degree": 1, "expert_parallel_degree": 1,
              "expert_tensor_parallel_degree": 1, "world_size": g * m * tp * pp}
    if draw(st.booleans()):
        layout["data_parallel_shard_degree"] = -1
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2]))):
        name = draw(st.sampled_from(sorted(layout)))
        layout[name] = draw(st.integers(-2, 70) if name == "world_size" else degree)
    return layout


def _is_int(v: Any) -> bool:
    return type(v) is int


def _parse_strategy(value: Any) -> str | None:
    """The code the oracle expects ("auto" for the planner), or None when invalid."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text.lower() == "auto":
        return "auto"
    code = ALIASES.get(text.lower(), text.upper())
    return code if code in CODES else None


def oracle(f: dict[str, Any]) -> tuple[str, list[tuple[str, str | None]]]:
    """``("stock" | "paro", violations)``; each violation is (text the message must contain, value repr)."""
    value = f["paro_strategy"]
    if value is None or (isinstance(value, str) and value.strip() in UNSET):
        return "stock", []
    bad: list[tuple[str, str | None]] = []
    code = _parse_strategy(f["paro_strategy"])
    if code is None:
        bad.append(("parallelism.paro_strategy", repr(f["paro_strategy"])))
    if f["paro_comm"] not in ("default", "ho_ring", "auto"):
        bad.append(("parallelism.paro_comm", repr(f["paro_comm"])))
    chunks = f["paro_ho_ring_chunks"]
    if not _is_int(chunks) or chunks < 0:
        bad.append(("parallelism.paro_ho_ring_chunks", repr(chunks)))
    elif chunks and f["paro_comm"] in ("default", "auto"):
        bad.append(("parallelism.paro_ho_ring_chunks", repr(chunks)))
    mem = f["paro_device_memory_gib"]
    if isinstance(mem, bool) or not isinstance(mem, (int, float)) or not math.isfinite(mem) or mem < 0:
        bad.append(("parallelism.paro_device_memory_gib", repr(mem)))
    if not isinstance(f["paro_calibration"], str):
        bad.append(("parallelism.paro_calibration", repr(f["paro_calibration"])))
    layout_bad = []
    for name in ("data_parallel_replicate_degree", "tensor_parallel_degree", "pipeline_parallel_degree",
                 "expert_tensor_parallel_degree"):
        if not _is_int(f[name]) or f[name] < 1:
            layout_bad.append((f"parallelism.{name}", repr(f[name])))
    for name in ("context_parallel_degree", "expert_parallel_degree"):
        if not _is_int(f[name]) or f[name] != 1:
            layout_bad.append((f"parallelism.{name}", repr(f[name])))
    m = f["data_parallel_shard_degree"]
    if not _is_int(m) or (m < 1 and m != -1):
        layout_bad.append(("parallelism.data_parallel_shard_degree", repr(m)))
    world = f["world_size"]
    if not _is_int(world) or world < 1:
        layout_bad.append(("world size", repr(world)))
    if not layout_bad:
        g, tp, pp = f["data_parallel_replicate_degree"], f["tensor_parallel_degree"], f["pipeline_parallel_degree"]
        if m == -1 and world % (g * tp * pp) == 0:
            m = world // (g * tp * pp)
        if m == -1:
            layout_bad.append(("parallelism.data_parallel_shard_degree=-1 has no value", None))
        elif g * m * tp * pp != world:
            layout_bad.append(("do not multiply to the world size", None))
        elif pp > 1 and ("ZeroBubble" in f["schedule"] or "DualPipe" in f["schedule"]):
            layout_bad.append(("parallelism.pipeline_parallel_schedule", repr(f["schedule"])))
        else:
            # The planner runs for the strategy, or for the collectives where there are two links.
            plans_comm = g > 1 and m > 1 and f["paro_comm"] == "auto"
            if code == "auto" and g * m == 1:
                layout_bad.append(("parallelism.paro_strategy='auto' needs at least 2 data-parallel ranks", None))
            if (code == "auto" or plans_comm) and f["calibration_kind"] not in ("empty", "match", "not_a_string"):
                layout_bad.append(("parallelism.paro_calibration", repr(f["paro_calibration"])))
        f["expected_mesh"] = (g, m)
    return "paro", bad + layout_bad


def _calibration_file(folder: Path, kind: str, g: int, m: int) -> Any:
    """A ``paro_calibration`` value of the given kind for a g x m mesh (written under ``folder``)."""
    path = folder / f"{kind}-{g}x{m}.json"
    good = Calibration(nodes=g, ranks_per_node=m, intra=LinkFit(1e-5, 1e10), inter=LinkFit(1e-4, 1e9))
    if kind == "empty":
        return ""
    if kind == "not_a_string":
        return 7
    if kind == "match":
        write_calibration(good, path)
    elif kind == "mismatch":
        write_calibration(Calibration(nodes=g + 1, ranks_per_node=m, intra=good.intra, inter=good.inter), path)
    elif kind == "missing":
        return str(folder / "does-not-exist.json")
    elif kind == "directory":
        return str(folder)
    elif kind == "not_json":
        path.write_text("nodes: 2\n")
    elif kind == "wrong_version":
        path.write_text(json.dumps({"format_version": 0, "nodes": g, "ranks_per_node": m}))
    elif kind == "bad_rate":
        path.write_text(json.dumps({"format_version": 1, "nodes": g, "ranks_per_node": m,
                                    "intra": {"latency": 0, "bandwidth": -1}, "inter": {"latency": 0, "bandwidth": 1}}))
    elif kind == "bad_kind":
        write_calibration(Calibration(nodes=g, ranks_per_node=m, intra=good.intra, inter=good.inter,
                                      ops={"broadcast": {"inter": LinkFit(0, 1e9)}}), path)
    return str(path)


@pytest.fixture(scope="module")
def cal_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("calibrations")


@EXAMPLES
@given(strategy=strategies_field, comm=comm_field, chunks=chunks_field, memory=memory_field, layout=layouts(),
       calibration_kind=calibration_kinds, schedule=schedule_field)
def test_paro_fields_and_degrees_are_accepted_or_refused_naming_the_field(
    cal_dir: Path, strategy: Any, comm: Any, chunks: Any, memory: Any, layout: dict[str, Any], calibration_kind: str,
    schedule: str
) -> None:
    g, m = layout["data_parallel_replicate_degree"], layout["data_parallel_shard_degree"]
    cal_shape = (g, m) if _is_int(g) and _is_int(m) and g >= 1 and m >= 1 else (2, 2)
    if _is_int(g) and g >= 1 and m == -1 and _is_int(layout["world_size"]):
        others = [layout[k] for k in ("tensor_parallel_degree", "pipeline_parallel_degree")]
        if all(_is_int(x) and x >= 1 for x in others) and layout["world_size"] % (g * others[0] * others[1]) == 0:
            cal_shape = (g, max(1, layout["world_size"] // (g * others[0] * others[1])))
    fields = {"paro_strategy": strategy, "paro_comm": comm, "paro_ho_ring_chunks": chunks,
              "paro_device_memory_gib": memory,
              "paro_calibration": _calibration_file(cal_dir, calibration_kind, *cal_shape),
              "calibration_kind": calibration_kind, "schedule": schedule, **layout}
    job = copy.deepcopy(_base_config())
    for name, value in fields.items():
        if name not in ("world_size", "calibration_kind", "schedule"):
            setattr(job.parallelism, name, value)
    job.parallelism.pipeline_parallel_schedule = schedule
    verdict, violations = oracle(fields)
    try:
        result = paro_settings(job, layout["world_size"])
    except ParoConfigError as e:
        message = str(e)
        event(f"refused: {message.split('=')[0].split(' ')[0]}")
        assert violations, f"refused a valid config {fields}: {message}"
        assert any(text in message and (value is None or value in message) for text, value in violations), (
            f"message does not name any of {violations}: {message}")
        assert SAYS_WHAT_IS_VALID.search(message), f"message does not say what is valid: {message}"
        return
    assert not violations, f"accepted {fields} despite {violations}"
    event(f"accepted: {verdict}")
    if verdict == "stock":
        assert result is None
        return
    assert isinstance(result, ParoSettings)
    code = _parse_strategy(strategy)
    assert result.auto == (code == "auto")
    assert result.strategy is None if code == "auto" else result.strategy.code == code
    g, m = fields["expected_mesh"]
    one_link = g == 1 or m == 1
    assert (result.groups, result.group_size) == (g, m)
    assert result.comm == ("default" if comm == "auto" and one_link else comm)
    assert result.device_memory_gib == float(memory)
    assert result.ho_ring_chunks == (chunks or None)
    assert result.plans_collectives == (not one_link and comm == "auto")


def _job(**fields: Any) -> Any:
    job = copy.deepcopy(_base_config())
    for name, value in fields.items():
        section, _, field = name.rpartition("__")
        setattr(getattr(job, section or "parallelism"), field, value)
    return job


def _write(folder: Path, name: str, content: Any) -> str:
    path = folder / name
    if isinstance(content, Calibration):
        write_calibration(content, path)
    else:
        path.write_text(content)
    return str(path)


_GOOD_CAL = Calibration(nodes=2, ranks_per_node=2, intra=LinkFit(1e-5, 1e10), inter=LinkFit(1e-4, 1e9))
AUTO = {"paro_strategy": "auto"}

# (fields, world size, what the message must contain); fields "section__name" outside [parallelism].
REFUSED = [
    ({"data_parallel_replicate_degree": 0}, 4, "parallelism.data_parallel_replicate_degree=0 is invalid; it is the "
     "number of groups (e.g. nodes) and must be an integer >= 1"),
    ({"data_parallel_replicate_degree": -1}, 4, "data_parallel_replicate_degree=-1 is invalid"),
    ({"data_parallel_shard_degree": 0}, 4, "data_parallel_shard_degree=0 is invalid; it is the number of ranks per "
     "group and must be an integer >= 1, or -1 for the ranks left over"),
    ({"data_parallel_shard_degree": -2}, 4, "data_parallel_shard_degree=-2 is invalid"),
    ({"data_parallel_shard_degree": -1, "tensor_parallel_degree": 3}, 8, "world size 8 is not divisible by "
     "data_parallel_replicate_degree (2) x tensor_parallel_degree (3) x pipeline_parallel_degree (1) = 6, so "
     "parallelism.data_parallel_shard_degree=-1 has no value; set the degrees so that their product is 8"),
    ({"data_parallel_shard_degree": -1, "tensor_parallel_degree": 4}, 4, "world size 4 is not divisible"),
    ({"tensor_parallel_degree": 0}, 4, "parallelism.tensor_parallel_degree=0 is invalid; it is the tensor-parallel "
     "degree (1: off) and must be an integer >= 1"),
    ({"tensor_parallel_degree": 2}, 4, "parallelism degrees do not multiply to the world size: "
     "data_parallel_replicate_degree (2) x data_parallel_shard_degree (2) x tensor_parallel_degree (2) x "
     "pipeline_parallel_degree (1) = 8, but 4 ranks were launched; set the degrees so that their product is 4"),
    ({"pipeline_parallel_degree": "2"}, 8, "parallelism.pipeline_parallel_degree='2' is invalid"),
    ({"pipeline_parallel_degree": 2.0}, 8, "parallelism.pipeline_parallel_degree=2.0 is invalid"),
    ({"expert_tensor_parallel_degree": 0}, 4, "parallelism.expert_tensor_parallel_degree=0 is invalid"),
    ({"context_parallel_degree": 2, "data_parallel_shard_degree": 1}, 4, "parallelism.context_parallel_degree=2 is "
     "not supported with parallelism.paro_strategy; set it to 1 (PaRO composes with tensor and pipeline "
     "parallelism)"),
    ({"expert_parallel_degree": 2}, 4, "parallelism.expert_parallel_degree=2 is not supported"),
    ({"context_parallel_degree": True}, 4, "parallelism.context_parallel_degree=True is not supported"),
    ({"context_parallel_degree": 0}, 4, "parallelism.context_parallel_degree=0 is not supported"),
    ({}, 0, "world size 0 is invalid: launch at least 1 rank"),
    ({"paro_strategy": 3}, 4, "parallelism.paro_strategy=3 is invalid: expected a string, a code of N/I/G (NNN, "),
    ({"paro_strategy": "IGN"}, 4, "parallelism.paro_strategy='IGN' is invalid: PaRO strategy 'IGN' is not "
     "effective"),
    ({"paro_comm": None}, 4, "parallelism.paro_comm=None is invalid; valid values: default, ho_ring"),
    ({"paro_comm": "HO_RING"}, 4, "parallelism.paro_comm='HO_RING' is invalid; valid values: default, ho_ring"),
    ({"paro_device_memory_gib": math.nan}, 4, "parallelism.paro_device_memory_gib=nan is invalid; it is the memory "
     "per rank in GiB, a finite number > 0, or 0 to ask the device"),
    ({"paro_device_memory_gib": -1}, 4, "parallelism.paro_device_memory_gib=-1 is invalid"),
    ({"paro_device_memory_gib": "8"}, 4, "parallelism.paro_device_memory_gib='8' is invalid"),
    ({"paro_calibration": 7}, 4, "parallelism.paro_calibration=7 is invalid; it is the path of a `paro probe` JSON"),
    ({**AUTO, "paro_calibration": "{tmp}/none.json"}, 4, "parallelism.paro_calibration='{tmp}/none.json' is not a "
     "usable `paro probe` file: calibration file '{tmp}/none.json' does not exist"),
    ({**AUTO, "paro_calibration": "{tmp}"}, 4, "parallelism.paro_calibration='{tmp}' is not a usable"),
    ({**AUTO, "paro_calibration": "not-json.json"}, 4, "is not valid JSON"),
    ({**AUTO, "paro_calibration": "old.json"}, 4, "format_version is 0; this version reads 1 (rerun paro probe)"),
    ({**AUTO, "paro_calibration": "bad-rate.json"}, 4, "link bandwidth must be a finite number of bytes/s > 0"),
    ({**AUTO, "paro_calibration": "bad-kind.json"}, 4, "Cluster.op_bw must map a collective kind"),
    ({**AUTO, "paro_calibration": "good.json", "data_parallel_replicate_degree": 1, "data_parallel_shard_degree": 4},
     4, "was measured on 2 group(s) x 2 rank(s), but this job's PaRO mesh is 1 x 4"),
    ({**AUTO, "data_parallel_replicate_degree": 1, "data_parallel_shard_degree": 1, "tensor_parallel_degree": 4}, 4,
     "parallelism.paro_strategy='auto' needs at least 2 data-parallel ranks"),
    ({"pipeline_parallel_degree": 2, "pipeline_parallel_schedule": "ZBVZeroBubble"}, 8,
     "parallelism.pipeline_parallel_schedule='ZBVZeroBubble' is not supported with parallelism.paro_strategy"),
    ({"fsdp_reshard_after_forward": "sometimes"}, 4, "parallelism.fsdp_reshard_after_forward='sometimes' is "
     "invalid; valid values: default, always, never"),
    ({"training__mixed_precision_param": "fp8"}, 4, "training.mixed_precision_param='fp8' is invalid; valid values: "),
]
ACCEPTED = [
    ({}, 4, ("IIG", 2, 2)),
    ({"data_parallel_shard_degree": -1, "tensor_parallel_degree": 2, "pipeline_parallel_degree": 2}, 16,
     ("IIG", 2, 2)),
    ({"paro_strategy": " zero2 ", "data_parallel_replicate_degree": 1, "data_parallel_shard_degree": 1,
      "tensor_parallel_degree": 2}, 2, ("NGG", 1, 1)),  # one data-parallel rank: every strategy runs as NNN
    ({"paro_device_memory_gib": 0}, 4, ("IIG", 2, 2)),
    ({"paro_comm": "ho_ring", "paro_calibration": "{tmp}/none.json"}, 4, ("IIG", 2, 2)),  # only "auto" reads it
    ({**AUTO, "paro_calibration": "good.json", "paro_device_memory_gib": 80}, 4, ("auto", 2, 2)),
    ({"pipeline_parallel_degree": 2, "pipeline_parallel_schedule": "Interleaved1F1B"}, 8, ("IIG", 2, 2)),
]


@pytest.fixture(scope="module")
def cal_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cal")
    _write(folder, "good.json", _GOOD_CAL)
    _write(folder, "not-json.json", "nodes: 2\n")
    _write(folder, "old.json", json.dumps({"format_version": 0}))
    _write(folder, "bad-rate.json", json.dumps({"format_version": 1, "nodes": 2, "ranks_per_node": 2,
                                                "intra": {"latency": 0, "bandwidth": 0},
                                                "inter": {"latency": 0, "bandwidth": 1}}))
    _write(folder, "bad-kind.json", Calibration(nodes=2, ranks_per_node=2, intra=_GOOD_CAL.intra,
                                                inter=_GOOD_CAL.inter, ops={"broadcast": {"inter": LinkFit(0, 1)}}))
    return folder


def _resolve(fields: dict[str, Any], folder: Path) -> dict[str, Any]:
    out = dict(fields)
    cal = out.get("paro_calibration")
    if isinstance(cal, str):
        out["paro_calibration"] = cal.format(tmp=folder) if "{tmp}" in cal else str(folder / cal)
    return out


@pytest.mark.parametrize(("fields", "world", "expected"), REFUSED, ids=[e[:70] for _, _, e in REFUSED])
def test_each_refusal_names_field_value_and_what_is_valid(cal_files: Path, fields: dict[str, Any], world: int,
                                                          expected: str) -> None:
    with pytest.raises(ParoConfigError) as info:
        paro_settings(_job(**_resolve(fields, cal_files)), world)
    assert expected.format(tmp=cal_files) in str(info.value)


@pytest.mark.parametrize(("fields", "world", "expected"), ACCEPTED)
def test_valid_layouts_start(cal_files: Path, fields: dict[str, Any], world: int, expected: tuple) -> None:
    settings_ = paro_settings(_job(**_resolve(fields, cal_files)), world)
    code = "auto" if settings_.auto else settings_.strategy.code
    assert (code, settings_.groups, settings_.group_size) == expected


def test_toml_values_of_the_wrong_type_are_refused_by_field(tmp_path: Path) -> None:
    """TOML values reach the config untyped: a quoted or fractional degree is refused at start-up."""
    from torchtitan.config import ConfigManager

    text = CONFIG.read_text()
    for line, expected in (('tensor_parallel_degree = "2"', "parallelism.tensor_parallel_degree='2' is invalid"),
                           ("context_parallel_degree = 1.0",
                            "parallelism.context_parallel_degree=1.0 is not supported")):
        toml = tmp_path / "job.toml"
        toml.write_text(text.replace("[parallelism]\n", f"[parallelism]\n{line}\n", 1))
        job = ConfigManager().parse_args(["--job.config_file", str(toml)])
        with pytest.raises(ParoConfigError, match=re.escape(expected)):
            paro_settings(job, 4)


def test_bad_config_stops_the_launch_before_any_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchtitan_patch.v0_2.train import _validate_early

    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ParoConfigError, match=r"paro_device_memory_gib=nan is invalid"):
        _validate_early(["--job.config_file", str(CONFIG), "--parallelism.paro_strategy", "auto",
                         "--parallelism.paro_device_memory_gib", "nan"])
    assert not dist.is_initialized()


# paro plan ------------------------------------------------------------------------------------

def _tagged_ints() -> st.SearchStrategy[tuple[str, int | None]]:
    return mostly(st.integers(1, 6).map(lambda i: (str(i), i)),
                  st.sampled_from([("0", None), ("-2", None), ("x", None), ("1.5", None), ("", None)]), odds=8)


def _tagged_floats(allow_zero: bool) -> st.SearchStrategy[tuple[str, float | None]]:
    def tag(x: float) -> tuple[str, float | None]:
        return repr(x), (x if (x >= 0 if allow_zero else x > 0) else None)

    return mostly(mostly(st.floats(1e-3, 1e4), st.sampled_from([1e-300, 1e300, 1.7e308]), odds=10).map(tag),
                  st.one_of(st.floats(-10, 1e-3, allow_nan=False).map(tag),
                            st.sampled_from([("inf", None), ("nan", None), ("-inf", None), ("fast", None),
                                             ("0", 0.0 if allow_zero else None)])), odds=8)


SUFFIX = {"k": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
counts = mostly(
    st.one_of(mostly(st.integers(10**6, 10**12), st.integers(1, 10**6)).map(lambda n: (str(n), n)),
              st.tuples(st.integers(1, 999), st.sampled_from(sorted(SUFFIX))).map(
                  lambda t: (f"{t[0]}{t[1]}", t[0] * SUFFIX[t[1]]))),
    st.sampled_from([("0", None), ("-5", None), ("7x", None), ("1e400", None), ("0.4", None), ("abc", None)]),
    odds=8,
)
# --trainable: ("count", n), ("fraction", x) or ("bad", None).
trainables = mostly(
    st.one_of(
        st.integers(1000, 10**9).map(lambda n: (str(n), ("count", n))),
        st.tuples(st.integers(1, 500), st.sampled_from(sorted(SUFFIX))).map(
            lambda t: (f"{t[0]}{t[1]}", ("count", t[0] * SUFFIX[t[1]]))),
        st.tuples(st.integers(1, 1000), st.integers(1, 1000)).map(
            lambda t: (f"{min(t)}/{max(t)}", ("fraction", min(t) / max(t)))),
        st.floats(1e-12, 0.999).map(lambda x: (repr(x), ("fraction", x))),
    ),
    st.one_of(
        st.integers(1, 999).map(lambda n: (str(n), ("bad", None))),  # a bare small count: ambiguous
        st.sampled_from([("0", ("bad", None)), ("2/1", ("bad", None)), ("1/0", ("bad", None)),
                         ("a/b", ("bad", None)), ("1.0", ("bad", None)), ("16.0", ("bad", None)),
                         ("-1", ("bad", None)), ("nan", ("bad", None))]),
    ),
    odds=4,
)
PLAN_FLAGS = {
    "--params": counts,
    "--trainable": trainables,
    "--nodes": _tagged_ints(),
    "--ranks-per-node": _tagged_ints(),
    "--blocks": _tagged_ints(),
    "--accum": _tagged_ints(),
    "--intra-bw": _tagged_floats(False),
    "--inter-bw": _tagged_floats(False),
    "--memory": _tagged_floats(False),
    "--inter-latency": _tagged_floats(True),
    "--comm": st.sampled_from([("default", "default"), ("ho_ring", "ho_ring"), ("ring", None), ("HO_RING", None)]),
}
SCALE = {"--intra-bw": 1e9, "--inter-bw": 1e9, "--memory": 2**30}  # GB/s and GiB to base units
REQUIRED = ("--params", "--nodes", "--ranks-per-node", "--intra-bw", "--inter-bw", "--memory")
OPTIONAL = ("--trainable", "--blocks", "--accum", "--inter-latency", "--comm")


@st.composite
def plan_args(draw: Any) -> dict[str, tuple[str, Any]]:
    """Flag -> (text, parsed value or None when invalid); a flag left out is absent."""
    args = {}
    for flag in REQUIRED:
        if draw(st.sampled_from(range(20))) != 10:  # a required flag is sometimes missing
            args[flag] = draw(PLAN_FLAGS[flag])
    for flag in OPTIONAL:
        if draw(st.booleans()):
            args[flag] = draw(PLAN_FLAGS[flag])
    return args


def plan_oracle(args: dict[str, tuple[str, Any]]) -> list[tuple[str, str | None]]:
    """Violations: (flag, the text given) for a bad value, (flag, None) for a missing or inconsistent one."""
    bad: list[tuple[str, str | None]] = []
    for flag, (text, value) in args.items():
        if value is None or value == ("bad", None):
            bad.append((flag, text))
    if bad:  # argparse stops at the first bad value
        return bad
    for flag in REQUIRED:
        if flag not in args:
            bad.append((flag, None))
    for flag, scale in SCALE.items():
        if flag in args and not math.isfinite(args[flag][1] * scale):
            bad.append((flag, None))
    if "--trainable" in args and "--params" in args:
        params = args["--params"][1]
        kind, value = args["--trainable"][1]
        trainable = value if kind == "count" else round(value * params)
        if not 1 <= trainable <= params:
            bad.append(("--trainable", None))
    return bad


@EXAMPLES
@given(args=plan_args())
def test_paro_plan_arguments_are_accepted_or_refused_naming_the_flag(args: dict[str, tuple[str, Any]]) -> None:
    argv = ["plan"]
    for flag, (text, _) in args.items():
        argv += [f"{flag}={text}"]  # "=": values like -5 are values, not flags
    violations = plan_oracle(args)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = paro_main(argv)
        except SystemExit as e:
            status = ("exit", e.code)
    event(f"status {status} {violations[0][0] if violations else ''}")
    if not violations:
        assert status in (0, 1), f"{argv} should plan, got {status}: {err.getvalue()}"
        lines = out.getvalue().splitlines()
        assert sum(1 for line in lines if line and not line.startswith(("#", "rank", "best", "nothing"))) == 14
        return
    assert status == ("exit", 2), f"{argv} should be refused for {violations}, got {status}"
    message = err.getvalue().strip().splitlines()[-1]
    assert any(flag in message and (text is None or repr(text) in message or f"{text}:" in message)
               for flag, text in violations), f"{message!r} names none of {violations}"
    assert SAYS_WHAT_IS_VALID.search(message) or "required" in message, message


@pytest.mark.parametrize(("trainable", "expected"), [
    ("1", "argument --trainable: 1: did you mean a fraction of --params (1/16 = 0.0625, or 1/1 for all of them) "
          "or a count with a suffix (1M, 1B)?"),
    ("16", "argument --trainable: 16: did you mean a fraction of --params (1/16 = 0.0625) or a count with a suffix "
           "(16M, 16B)? A count without a suffix must be >= 1,000; write a smaller one with a suffix (0.016k) if you "
           "mean exactly 16"),
    ("1e-30", "--trainable: 1e-30 of the 65,000,000,000 parameters of the model is less than 1 parameter"),
])
def test_paro_plan_asks_what_a_tiny_trainable_count_means(capsys: pytest.CaptureFixture[str], trainable: str,
                                                         expected: str) -> None:
    argv = ["plan", "--params", "65B", "--trainable", trainable, "--nodes", "2", "--ranks-per-node", "8",
            "--intra-bw", "150", "--inter-bw", "3", "--memory", "80"]
    with pytest.raises(SystemExit) as info:
        paro_main(argv)
    assert info.value.code == 2 and expected in capsys.readouterr().err
    assert paro_main(argv[:4] + ["0.016k"] + argv[5:]) in (0, 1)  # a suffix says it is a count
    assert "Psi' = 16 trainable" in capsys.readouterr().out


PLAN = ["plan", "--params", "7B", "--nodes", "2", "--ranks-per-node", "8", "--intra-bw", "150", "--inter-bw", "3",
        "--memory", "80"]


@pytest.mark.parametrize(("extra", "expected"), [
    (["--inter-bw", "1e308"], "--inter-bw 1e+308: 1e+308 GB/s is too large to compute with; give a realistic value"),
    (["--memory", "1e300"], "--memory 1e+300: 1e+300 GiB is too large to compute with"),
    (["--activation-memory", "1e300"], "--activation-memory 1e+300: 1e+300 GiB is too large"),
    (["--params", "1e400"], "argument --params: expected a finite parameter count such as 7B or 6.7e9, got '1e400'"),
    (["--trainable", "8B"], "--trainable: 8000000000 trainable parameters exceed the 7000000000 parameters of the "
                            "model; give at most 7000000000, or a fraction of the model such as 1/16"),
    (["--calibration", "bad-kind.json"], "--calibration: Cluster.op_bw must map a collective kind"),
])
def test_paro_plan_refuses_values_it_cannot_compute_with(cal_files: Path, extra: list[str], expected: str) -> None:
    if "--calibration" in extra:  # the file's shape and rates, except the bad kind
        extra = [extra[0], str(cal_files / extra[1])]
        argv = ["plan", "--params", "7B", "--memory", "80", *extra]
    else:
        argv = PLAN + extra
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as info:
        paro_main(argv)
    assert info.value.code == 2 and expected in err.getvalue(), err.getvalue()


def test_a_group_order_torch_cannot_keep_says_which_torch_can(monkeypatch):
    """Before torch 2.13 ``new_group`` sorts the ranks: a group that needs another order must
    fail with the order and the fix, not come out silently reordered."""
    from paro_fsdp.comm import torch_compat

    monkeypatch.setattr(torch_compat, "_NEW_GROUP_KEEPS_ORDER", False)
    with pytest.raises(NotImplementedError, match=r"needs the order \[2, 0, 1, 3\]; upgrade to torch >= 2.13"):
        torch_compat.new_group_in_order([2, 0, 1, 3])
