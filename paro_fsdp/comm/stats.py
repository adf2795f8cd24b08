"""Per-rank accounting of the bytes each collective sends, split by link and training phase.

Collectives record what the calling rank puts on the wire for the algorithm they run (a
ring all-gather of S bytes over k ranks sends (k-1)/k*S), so the totals can be checked
against PARO.md's formulas; the emulated cluster checks them against interface counters.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections import defaultdict
from collections.abc import Iterator

INTRA = "intra"
INTER = "inter"
LINKS = (INTRA, INTER)
PHASES = ("param_gather", "grad_reduce", "sync_g", "sync_p", "other")

_phase: contextvars.ContextVar[str] = contextvars.ContextVar("paro_comm_phase", default="other")


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Attribute the bytes sent inside the block to training phase ``name``."""
    if name not in PHASES:
        raise ValueError(f"unknown communication phase {name!r}; expected one of {PHASES}")
    token = _phase.set(name)
    try:
        yield
    finally:
        _phase.reset(token)


def current_phase() -> str:
    return _phase.get()


class CommStats:
    """Bytes sent by this rank, keyed by (phase, link); of those, how many were quantized.

    Collectives may be issued from a worker thread (:mod:`paro_fsdp.comm.relay`), so the counts
    are updated under a lock.
    """

    def __init__(self) -> None:
        self._bytes: defaultdict[tuple[str, str], int] = defaultdict(int)
        self._quantized: defaultdict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def add(self, link: str, nbytes: int, phase_name: str | None = None, *, quantized: bool = False) -> None:
        if link not in LINKS:
            raise ValueError(f"unknown link {link!r}; expected one of {LINKS}")
        key = (phase_name or current_phase(), link)
        with self._lock:
            self._bytes[key] += int(nbytes)
            if quantized:
                self._quantized[link] += int(nbytes)

    def reset(self) -> None:
        with self._lock:
            self._bytes.clear()
            self._quantized.clear()

    def quantized(self, link: str | None = None) -> int:
        """Of the bytes counted, those sent block-quantized (scales included), on one or both links."""
        return sum(v for l, v in self._quantized.items() if link is None or l == link)

    def get(self, phase_name: str | None = None, link: str | None = None) -> int:
        """Total bytes, optionally restricted to one phase and/or one link."""
        return sum(
            v for (p, l), v in self._bytes.items()
            if (phase_name is None or p == phase_name) and (link is None or l == link)
        )

    def as_dict(self) -> dict[str, dict[str, int]]:
        """``{phase: {"intra": bytes, "inter": bytes}}`` for every phase, zeros included."""
        return {p: {l: self._bytes.get((p, l), 0) for l in LINKS} for p in PHASES}

    def __repr__(self) -> str:
        return f"CommStats(intra={self.get(link=INTRA)}, inter={self.get(link=INTER)})"
