"""Failed collectives, named: which collective, in which training phase, over which link and ranks.

A collective that cannot complete (a peer's process died, a link is down for longer than the
process group's timeout) surfaces at ``wait()`` as the backend's error: for gloo a
``RuntimeError`` / ``torch.distributed.DistBackendError`` such as ``Timed out waiting 15000ms
for recv operation to complete`` or ``Connection closed by peer``, which says nothing about what
was running. :class:`~paro_fsdp.comm.groups.Pending` records what it issued (:class:`Issued`)
and re-raises such an error as a :class:`CollectiveError` chained from the original.

Timeouts. The process group's timeout bounds how long a collective may wait for a peer; gloo
enforces it on every wait inside the collective, so a rank whose peer is unreachable fails
that long after the collective stalls. Groups a ``DeviceMesh`` creates do not inherit the
default group's timeout (c10d gives every new group its backend's default: 30 minutes for
gloo, 10 for NCCL), so :func:`adopt_default_timeout` gives PaRO's groups the one passed to
``init_process_group``, and :func:`set_collective_timeout` shortens every group's after
warm-up (see ``docs/RELIABILITY.md`` for the values and why).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Issued:
    """One collective as the library issued it.

    ``collective``: the ``torch.distributed`` call (``all_gather``, ``reduce_scatter``,
    ``all_reduce``, ``all_to_all``); ``purpose``: the collective it implements when that differs
    (gloo's reduce-scatter is an ``all_to_all`` plus a local sum); ``link``: ``intra`` or
    ``inter``; ``ranks``: the global ranks of its group; ``phase``: the training phase current
    when it was issued.
    """

    collective: str
    link: str
    ranks: tuple[int, ...]
    phase: str
    group: dist.ProcessGroup | None = field(default=None, repr=False, compare=False)
    purpose: str | None = None
    started: float = field(default_factory=time.monotonic, compare=False)

    def describe(self) -> str:
        what = self.collective if not self.purpose else f"{self.collective} (for {self.purpose})"
        return (f"{what} over the {self.link} link, group ranks {list(self.ranks)}, "
                f"issued in phase {self.phase}")


class CollectiveError(dist.DistError):
    """A collective issued by PaRO failed; ``__cause__`` is the backend's error.

    Attributes: ``collective``, ``purpose``, ``link``, ``ranks``, ``phase`` (see
    :class:`Issued`), ``rank`` (this process's global rank), ``elapsed_s`` (issue to failure),
    ``timeout_s`` (the group's timeout when it failed, if known) and ``reason``: ``timeout``,
    ``connection`` (a peer closed or reset the connection) or ``error``.
    """

    def __init__(self, issued: Issued, cause: BaseException, rank: int | None = None) -> None:
        self.collective, self.purpose, self.link = issued.collective, issued.purpose, issued.link
        self.ranks, self.phase = issued.ranks, issued.phase
        self.rank = rank
        self.elapsed_s = time.monotonic() - issued.started
        timeout = group_timeout(issued.group) if issued.group is not None else None
        self.timeout_s = timeout.total_seconds() if timeout is not None else None
        self.reason = failure_reason(cause)
        detail = str(cause).strip().splitlines()
        limit = f" (process-group timeout {self.timeout_s:g} s)" if self.timeout_s is not None else ""
        who = f"rank {rank}: " if rank is not None else ""
        super().__init__(
            f"{who}{issued.describe()}: {_REASONS[self.reason]} {self.elapsed_s:.1f} s after it was "
            f"issued{limit}: {detail[0] if detail else type(cause).__name__}"
        )

    def __reduce__(self):  # picklable across processes, without re-running __init__
        return _rebuild, (str(self), dict(self.__dict__))


def _rebuild(message: str, attributes: dict) -> CollectiveError:
    error = CollectiveError.__new__(CollectiveError)
    dist.DistError.__init__(error, message)
    error.__dict__.update(attributes)
    return error


_REASONS = {"timeout": "timed out", "connection": "lost its connection to a peer", "error": "failed"}


def failure_reason(error: BaseException) -> str:
    """``timeout``, ``connection`` or ``error``: what a backend's exception says went wrong."""
    text = str(error).lower()
    if "timed out" in text or "timeout" in text:
        return "timeout"
    if any(s in text for s in ("connection closed", "connection reset", "broken pipe", "connection refused",
                               "socket closed", "read error", "write error")):
        return "connection"
    return "error"


def _backend(group: dist.ProcessGroup) -> object | None:
    for device in ("cpu", "cuda"):
        try:
            return group._get_backend(torch.device(device))
        except (RuntimeError, ValueError, AttributeError):
            continue
    return None


def group_timeout(group: dist.ProcessGroup) -> timedelta | None:
    """The timeout ``group``'s backend enforces now (gloo, NCCL), or None if it does not say."""
    backend = _backend(group)
    timeout = getattr(getattr(backend, "options", None), "_timeout", None)
    return timeout if isinstance(timeout, timedelta) else None


def _set_timeout(group: dist.ProcessGroup, timeout: timedelta) -> bool:
    from torch.distributed.distributed_c10d import _set_pg_timeout

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # backends other than gloo / NCCL keep their own
        try:
            _set_pg_timeout(timeout, group)
        except (ValueError, AssertionError, RuntimeError, AttributeError):
            return False
    return group_timeout(group) == timeout


def adopt_default_timeout(groups: list[dist.ProcessGroup]) -> None:
    """Give each of ``groups`` left at c10d's default timeout the default process group's.

    ``init_process_group(timeout=...)`` sets the default group's timeout only; groups created
    afterwards (a ``DeviceMesh``'s included) get the backend's default, 30 minutes for gloo.
    Groups given a timeout of their own keep it.
    """
    from torch.distributed.distributed_c10d import _get_default_timeout

    if not dist.is_initialized():
        return
    wanted = group_timeout(dist.group.WORLD)
    if wanted is None:
        return
    for group in groups:
        current = group_timeout(group)
        if current is None or current == wanted:
            continue
        try:
            backend_default = _get_default_timeout(dist.get_backend(group))
        except (RuntimeError, ValueError):
            continue
        if current == backend_default:
            _set_timeout(group, wanted)


def set_collective_timeout(timeout: timedelta | float) -> int:
    """Set ``timeout`` (a timedelta or seconds) on every process group this rank belongs to.

    For after warm-up: start with a generous timeout (compilation, first allocations and
    checkpoint loading make the first step slow), then shorten it so that a dead link or a
    hung peer fails the job quickly. Call it on every rank at the same point, after a
    collective that all ranks pass (e.g. a barrier), so that no rank still in a slow warm-up
    collective meets the shorter timeout. Returns how many groups took it.
    """
    from torch.distributed.distributed_c10d import _world

    if not isinstance(timeout, timedelta):
        timeout = timedelta(seconds=float(timeout))
    done = 0
    for group in list(_world.pg_map):
        if group._device_types and _set_timeout(group, timeout):
            done += 1
    return done
