"""PaRO strategy model: a partition granularity for parameters, gradients and optimizer states."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass


class Granularity(enum.IntEnum):
    """How finely one model state is partitioned; the value orders them (N < I < G)."""

    N = 0  # not partitioned: every rank holds all of it
    I = 1  # partitioned inside the group: each rank holds 1/m  # noqa: E741
    G = 2  # partitioned globally: each rank holds 1/n

    def fraction(self, m: int, n: int) -> float:
        """Share of the whole state one rank holds on a mesh of n ranks in groups of m."""
        return {Granularity.N: 1.0, Granularity.I: 1.0 / m, Granularity.G: 1.0 / n}[self]


_ALIASES = {
    "ddp": "NNN",
    "zero1": "NNG",
    "zero2": "NGG",
    "zero3": "GGG",
    "fsdp": "GGG",
    "mics": "III",
    "hsdp": "III",
}


@dataclass(frozen=True)
class ParoStrategy:
    """Granularities of parameters (P), gradients (G) and optimizer states (O).

    Only strategies with ``P <= O`` and ``G <= O`` are effective: partitioning P or G
    finer than O adds communication while O, the largest state, sets the memory.
    """

    param: Granularity
    grad: Granularity
    optim: Granularity

    def __post_init__(self) -> None:
        if self.param > self.optim or self.grad > self.optim:
            raise ValueError(
                f"PaRO strategy {self.code!r} is not effective: parameters and gradients must not "
                f"be partitioned finer than optimizer states. Valid codes: {_valid_codes_text()}"
            )

    @property
    def code(self) -> str:
        return f"{self.param.name}{self.grad.name}{self.optim.name}"

    def __str__(self) -> str:
        return self.code

    @property
    def aliases(self) -> tuple[str, ...]:
        return tuple(a for a, c in _ALIASES.items() if c == self.code)

    @classmethod
    def parse(cls, value: "str | ParoStrategy") -> "ParoStrategy":
        """Parse a three-letter code (any case, e.g. ``"IIG"``) or an alias (``"zero3"``)."""
        if isinstance(value, ParoStrategy):
            return value
        if not isinstance(value, str):
            raise TypeError(f"PaRO strategy must be a string, got {type(value).__name__}")
        text = value.strip()
        code = _ALIASES.get(text.lower(), text.upper())
        if len(code) != 3 or any(c not in Granularity.__members__ for c in code):
            raise ValueError(
                f"Unknown PaRO strategy {value!r}: expected a three-letter code of N/I/G for "
                f"parameters, gradients and optimizer states, or an alias "
                f"({', '.join(sorted(_ALIASES))}). Valid codes: {_valid_codes_text()}"
            )
        return cls(*(Granularity[c] for c in code))

    @classmethod
    def all_valid(cls) -> list["ParoStrategy"]:
        """The 14 effective strategies, ordered by optimizer granularity then code."""
        out = []
        for p, g, o in itertools.product(Granularity, repeat=3):
            if p <= o and g <= o:
                out.append(cls(p, g, o))
        return sorted(out, key=lambda s: (s.optim, s.param, s.grad))

    def effective_on(self, groups: int, group_size: int) -> "ParoStrategy":
        """The strategy this one behaves as on a degenerate mesh.

        With one rank per group (m = 1), I partitions over a single rank and means N; with
        a single group (g = 1), I spans every rank and means G.
        """
        def collapse(x: Granularity) -> Granularity:
            if x is Granularity.I and group_size == 1:
                return Granularity.N
            if x is Granularity.I and groups == 1:
                return Granularity.G
            return x

        return ParoStrategy(collapse(self.param), collapse(self.grad), collapse(self.optim))


DDP_BUCKET_MB = 25.0  # torch DDP's default bucket_cap_mb


def bucket_bytes(strategy: ParoStrategy, cap_mb: float | None, groups: int) -> float:
    """Bytes of trainable parameters consecutive blocks gather into one unit under ``strategy``
    on ``groups`` groups (0: a unit per block); ``cap_mb`` is ``paro_parallelize``'s ``bucket_cap_mb``.

    Only where P = N: elsewhere a unit per block bounds what is gathered at once. ``None``
    buckets as DDP does (25 MiB) where P = O = N on one group, and keeps a unit per block
    otherwise: where P = N is coarser than O each unit's sync_p overlaps the next forward block
    by block, and wherever the gradient reduction crosses groups each unit's overlaps the
    backward, which one unit for many blocks would give up (``docs/design.md``, "P = N units
    are buckets"; ``docs/bucket-cap.md``).
    """
    if strategy.param is not Granularity.N:
        return 0.0
    if cap_mb is None:
        return DDP_BUCKET_MB * 2**20 if strategy.optim is Granularity.N and groups == 1 else 0.0
    return cap_mb * 2**20


def _valid_codes_text() -> str:
    return ", ".join(s.code for s in ParoStrategy.all_valid())
