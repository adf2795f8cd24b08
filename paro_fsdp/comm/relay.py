"""Second hops: a collective issued on another one's result as soon as that result lands.

A quantized all-reduce crosses the inter-group link twice: an all-to-all of quantized chunks,
a sum, then an all-gather of the quantized sums. The second hop needs the first one's result,
so it cannot be issued with it; issued only when the caller waits (at the clip or the
optimizer step), it would overlap no compute, and the second hops of a step's units would run
one after the other. Issued eagerly, it must still be issued in the same order on every rank
of its group, and no rank may block its compute on a first hop. How depends on what waiting
for the first hop costs the host:

- **Stream-ordered backends** (NCCL and the other device backends): waiting for a collective
  only orders the waiting stream after it. The caller issues both hops at once, the second on a
  side stream that waits for the first; the host never blocks, and the order on every rank is
  the caller's program order (:class:`StreamRelay`).
- **gloo**: waiting blocks the host. One worker thread per mesh waits for the first hops in the
  order the caller issued them and issues each second hop as its first lands, on a process
  group of its own with the inter group's ranks (:class:`ThreadRelay`): the second hops then
  have one order on every rank among themselves, and they cannot interleave in different
  orders with the collectives the caller issues on the inter group meanwhile.

Either way the caller's handle waits for the second hop only.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol

import torch
import torch.distributed as dist

from paro_fsdp.comm.errors import adopt_default_timeout

if TYPE_CHECKING:
    from paro_fsdp.comm.groups import Pending

#: ``hop(group)`` waits for a first hop and issues the second on ``group``; its handle.
Hop = Callable[[dist.ProcessGroup], "Pending"]


class Relay(Protocol):
    def submit(self, hop: Hop) -> Callable[[], None]:
        """Have ``hop`` issued as soon as its first hop lands; the returned call waits for the
        second hop (call it at the same program point on every rank)."""
        ...


class StreamRelay:
    """Both hops issued by the caller, the second queued on a side stream after the first.

    On a device without streams (the CPU with a backend whose waits do not block, such as the
    threaded test backend) the hop simply runs at once.
    """

    def __init__(self, group: dist.ProcessGroup, device: torch.device) -> None:
        self.group = group
        self._device = device
        self._module = torch.get_device_module(device.type) if device.type != "cpu" else None
        self._stream = None

    def submit(self, hop: Hop) -> Callable[[], None]:
        dm = self._module
        if dm is None:
            return hop(self.group).wait
        if self._stream is None:
            self._stream = dm.Stream(self._device)
        side = self._stream
        side.wait_stream(dm.current_stream(self._device))  # the first hop's input, written by the caller
        with dm.stream(side):
            pending = hop(self.group)

        def landed() -> None:
            with dm.stream(side):
                pending.wait()  # the dequantized sums are written on the side stream
            dm.current_stream(self._device).wait_stream(side)

        return landed


class ThreadRelay:
    """One worker thread issues the second hops, in submission order, on a group of its own.

    The group (the inter group's ranks, its backend) is created at the first submission, which
    every rank of the group reaches at the same program point; only those ranks take part
    (``use_local_synchronization``).
    """

    def __init__(self, ranks: tuple[int, ...], backend: str) -> None:
        self._ranks, self._backend = ranks, backend
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="paro-second-hop")

    @functools.cached_property
    def group(self) -> dist.ProcessGroup:
        group = dist.new_group(list(self._ranks), backend=self._backend, use_local_synchronization=True)
        adopt_default_timeout([group])
        return group

    def submit(self, hop: Hop) -> Callable[[], None]:
        group = self.group
        issued = self._worker.submit(contextvars.copy_context().run, hop, group)  # counts under the caller's phase
        return lambda: issued.result().wait()
