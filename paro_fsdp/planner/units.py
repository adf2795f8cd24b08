"""Human-readable sizes, rates and times: one scale per column, chosen by its largest value."""

from __future__ import annotations

BINARY = ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"), (1, "B"))
DECIMAL = ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "B"))
SECONDS = ((1.0, "s"), (1e-3, "ms"), (1e-6, "us"))


def unit(largest: float, units: tuple[tuple[float, str], ...]) -> tuple[float, str]:
    """The largest unit ``largest`` is at least 1 of (the smallest unit for tiny values)."""
    for scale, name in units:
        if largest >= scale:
            return scale, name
    return units[-1]


def fmt(value: float, units: tuple[tuple[float, str], ...]) -> str:
    scale, name = unit(abs(value), units)
    return f"{value / scale:.3g} {name}"
