"""Link calibration: latency and bandwidth per link, fitted from timed collectives.

``paro probe`` writes it; ``paro plan --calibration`` and torchtitan's ``paro_strategy = "auto"``
read it. The file is JSON so it can be checked in beside a training config.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

from paro_fsdp.planner.inputs import Cluster, HORingCost

FORMAT_VERSION = 1


@dataclass(frozen=True)
class LinkFit:
    """``seconds = latency + bytes_sent_per_rank / bandwidth`` for one link."""

    latency: float
    bandwidth: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.latency) and self.latency >= 0):
            raise ValueError(f"link latency must be a finite number of seconds >= 0, got {self.latency!r}")
        if not (math.isfinite(self.bandwidth) and self.bandwidth > 0):
            raise ValueError(f"link bandwidth must be a finite number of bytes/s > 0, got {self.bandwidth!r}")


def _least_squares(points: list[tuple[float, float]]) -> tuple[float, float]:
    """``(slope, intercept)`` of the least-squares line through ``(x, y)`` points (>= 2 distinct x)."""
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return slope, mean_y - slope * mean_x


def fit_link(points: list[tuple[float, float]]) -> LinkFit:
    """Least-squares line through ``(bytes_sent_per_rank, seconds)`` points.

    Noise can make the fitted intercept slightly negative; it is clamped to 0 (latency), and
    a non-positive slope (timings not growing with size) is an error: the sizes were too small
    to see the bandwidth.
    """
    if len({b for b, _ in points}) < 2:
        raise ValueError(f"fitting a link needs timings at >= 2 distinct sizes, got {len(points)} point(s)")
    slope, intercept = _least_squares(points)
    if slope <= 0:
        raise ValueError(
            f"collective times do not grow with size (points {points}): use larger probe sizes "
            f"(paro probe --sizes) so bandwidth, not latency, dominates the largest ones"
        )
    return LinkFit(latency=max(0.0, intercept), bandwidth=1.0 / slope)


def fit_ho_ring_cost(points: list[tuple[int, float]], two_phase_seconds: float, overlap_seconds: float) -> HORingCost:
    """What cutting a global collective into HO-Ring's chunks costs, from one collective timed
    with the two-phase collectives (``two_phase_seconds``) and with HO-Ring at >= 2 depths
    (``points``: ``(depth, seconds)``), all at one size.

    ``overlap_seconds`` is min(a, b) of that collective, from the links' fits. The planner
    prices the two-phase collective as a + b + latencies and HO-Ring at depth C as
    max(a, b) + min(a, b) / C + latencies + :class:`HORingCost` ``.seconds(C)``, i.e.
    ``two_phase - overlap_seconds * (1 - 1/C) + fixed + (C - 1) * per_chunk``: ``per_chunk`` is
    the least-squares slope of ``seconds - overlap_seconds / C`` over C, ``fixed`` what is left
    against the two-phase time. The planner only prices depths inside the range timed.
    """
    if len({c for c, _ in points}) < 2 or min(c for c, _ in points) < 2:
        raise ValueError(f"fitting HO-Ring's cost needs timings at >= 2 distinct depths >= 2, got {points}")
    per_chunk, _ = _least_squares([(c, t - overlap_seconds / c) for c, t in points])
    fixed = sum(t - two_phase_seconds + overlap_seconds * (1 - 1 / c) - (c - 1) * per_chunk
                for c, t in points) / len(points)
    return HORingCost(fixed=fixed, per_chunk=per_chunk)


@dataclass(frozen=True)
class Calibration:
    """Measured link rates of one cluster shape (``nodes`` x ``ranks_per_node``).

    ``intra`` / ``inter`` are the all-gather fits; ``ops`` holds the other collective kinds'
    fits, ``{"reduce_scatter": {"inter": LinkFit, ...}, "all_reduce": {...}}``, since backends
    do not run every kind at the same rate. ``points`` keeps the timings, ``{kind: {link: [(bytes,
    seconds)]}}``. ``quant_rate`` is the elements per second one rank quantized and dequantized
    (0: not measured). ``ho_ring_cost`` is, per collective kind, what cutting a global collective
    into HO-Ring's chunks costs (:func:`fit_ho_ring_cost`), fitted from ``ho_ring_points``,
    ``{kind: [(depth, seconds)]}`` with depth 0 for the two-phase collectives (empty: not
    measured; the planner then charges each chunk the links' latencies).
    """

    nodes: int
    ranks_per_node: int
    intra: LinkFit
    inter: LinkFit
    ops: dict[str, dict[str, LinkFit]] = field(default_factory=dict)
    backend: str = ""
    device_type: str = ""
    points: dict[str, dict[str, list[tuple[float, float]]]] = field(default_factory=dict)
    quant_rate: float = 0.0
    ho_ring_cost: dict[str, HORingCost] = field(default_factory=dict)
    ho_ring_points: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def write_calibration(cal: Calibration, path: str | os.PathLike) -> None:
    data = {"format_version": FORMAT_VERSION, **asdict(cal)}
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def read_calibration(path: str | os.PathLike) -> Calibration:
    """Load a file written by ``paro probe``, with errors that name the file and the field."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"calibration file {os.fspath(path)!r} does not exist; write one with "
                                f"`torchrun ... -m paro_fsdp probe --out {os.fspath(path)}`") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"calibration file {os.fspath(path)!r} is not valid JSON: {e}") from None
    try:
        return calibration_from_dict(data)
    except ValueError as e:
        raise ValueError(f"calibration file {os.fspath(path)!r}: {e}") from None


def calibration_from_dict(data: object) -> Calibration:
    """The inverse of the JSON ``write_calibration`` writes."""
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        found = data.get("format_version") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"format_version is {found!r}; this version reads {FORMAT_VERSION} (rerun paro probe)")
    try:
        return Calibration(
            nodes=int(data["nodes"]),
            ranks_per_node=int(data["ranks_per_node"]),
            intra=LinkFit(**data["intra"]),
            inter=LinkFit(**data["inter"]),
            ops={kind: {link: LinkFit(**fit) for link, fit in links.items()}
                 for kind, links in data.get("ops", {}).items()},
            backend=str(data.get("backend", "")),
            device_type=str(data.get("device_type", "")),
            points={kind: {link: [tuple(p) for p in pts] for link, pts in links.items()}
                    for kind, links in data.get("points", {}).items()},
            quant_rate=float(data.get("quant_rate", 0.0)),
            ho_ring_cost={kind: HORingCost(**cost) for kind, cost in data.get("ho_ring_cost", {}).items()},
            ho_ring_points={kind: [(int(c), float(t)) for c, t in pts]
                            for kind, pts in data.get("ho_ring_points", {}).items()},
        )
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"a field is missing or malformed: {e!r}; expected nodes, ranks_per_node, intra and "
                         f"inter ({{latency, bandwidth}}), optionally ops ({{kind: {{link: {{latency, bandwidth}}}}}}) "
                         f"and ho_ring_cost ({{kind: {{fixed, per_chunk}}}})") from None


def cluster_from_calibration(cal: Calibration, device_memory: float) -> Cluster:
    """The measured cluster with ``device_memory`` bytes per rank."""
    return Cluster(nodes=cal.nodes, ranks_per_node=cal.ranks_per_node, intra_bw=cal.intra.bandwidth,
                   inter_bw=cal.inter.bandwidth, device_memory=device_memory,
                   intra_latency=cal.intra.latency, inter_latency=cal.inter.latency,
                   **({"quant_rate": cal.quant_rate} if cal.quant_rate > 0 else {}),
                   ho_ring_cost=dict(cal.ho_ring_cost),
                   op_bw={kind: {link: fit.bandwidth for link, fit in links.items()} for kind, links in cal.ops.items()})
