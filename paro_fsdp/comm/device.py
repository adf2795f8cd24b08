"""The device a process group's collectives take their tensors on, and object collectives that use it.

NCCL moves only tensors on the GPU its communicator belongs to, and a job launched like
torchtitan's (``init_process_group("nccl")``) has no CPU backend at all: a host tensor
reduced over its default group fails. gloo, or a group with a CPU backend beside the device
one (``"cpu:gloo,cuda:nccl"``, the default of ``init_process_group()``), takes host tensors.
The scalars the library reduces across ranks (probe times, gradient norms) go on
:func:`collective_device`, and torch's object collectives, which serialize to a tensor on
that backend's "current device", run with that device current.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

_CPU = torch.device("cpu")


def _default_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    return group if group is not None else dist.distributed_c10d._get_default_group()


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where tensors for collectives over ``group`` (default: the default group) must live.

    The host when the group has a CPU backend (gloo, or a CPU backend beside the device one),
    as torch's object collectives choose; otherwise the device the group is bound to
    (``init_process_group(device_id=...)``), else the current device of its device type.
    """
    group = _default_group(group)
    types = [d.type for d in getattr(group, "_device_types", ())]
    if not types:  # no backend registered for a device type yet: torch's object collectives use the host
        return _CPU
    if "cpu" in types:
        return _CPU
    bound = getattr(group, "bound_device_id", None)
    if bound is not None:
        return bound
    device_type = types[0]
    return torch.device(device_type, torch.get_device_module(device_type).current_device())


@contextlib.contextmanager
def _current(device: torch.device) -> Iterator[None]:
    """Make ``device`` the current device of its type for the block (nothing to do for the host)."""
    if device.type == "cpu" or device.index is None:
        yield
        return
    with torch.get_device_module(device.type).device(device.index):
        yield


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """``dist.barrier`` on ``group``'s collective device (NCCL otherwise guesses it, with a warning)."""
    device = collective_device(group)
    if device.type == "cpu" or device.index is None:
        dist.barrier(group=group)
    else:
        with _current(device):
            dist.barrier(group=group, device_ids=[device.index])


def all_gather_object(obj: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Every rank's ``obj``, in rank order of ``group`` (``dist.all_gather_object`` on its device)."""
    everyone: list[Any] = [None] * dist.get_world_size(group)
    with _current(collective_device(group)):
        dist.all_gather_object(everyone, obj, group=group)
    return everyone


def broadcast_object(obj: Any, src: int = 0, group: dist.ProcessGroup | None = None) -> Any:
    """Global rank ``src``'s ``obj`` on every rank of ``group`` (``broadcast_object_list`` on its device)."""
    box = [obj]
    device = collective_device(group)
    with _current(device):
        dist.broadcast_object_list(box, src=src, group=group, device=device)
    return box[0]
