"""CPU mode: the few shims that let torchtitan's trainer run on CPU with gloo.

torchtitan assumes an accelerator. This module is the one place that works around
that, and only when no accelerator is present; on a GPU machine nothing here is applied and
the same TOML runs with plain ``-m torchtitan.train``. Each shim, and why:

1. Device type. ``torchtitan.tools.utils`` falls back to ``"cuda"`` when no accelerator is
   found, and several modules copy ``device_type`` / ``device_module`` at import time. We
   point every loaded torchtitan module, and ``get_device_info`` for those imported later,
   at ``"cpu"`` and :class:`CpuDeviceModule`.
2. Device module. The trainer and the memory monitor call CUDA-only functions
   (``set_device``, ``current_device`` as an index, ``get_device_name``, ``get_device_properties``, ``memory_stats``,
   ``reset_peak_memory_stats``, ``empty_cache``). :class:`CpuDeviceModule` answers them for
   the host: device name and capacity of the machine, and the process's resident memory as
   "active" (current RSS) and "reserved" (peak RSS).
3. Gradient reduction. torchtitan sets FSDP's gradient divide factor to 1 (the loss is
   already divided by the global token count), which FSDP implements with ``PREMUL_SUM``; gloo
   has no ``PREMUL_SUM``. Forcing sum reductions on every FSDP module gives the same result
   (a plain sum, then FSDP's own division, which is 1 here) with ops gloo supports. This is
   applied by wrapping each model's parallelize function (PP passes the same function to
   every stage).

Each adapter's ``cpu`` module applies these the way its release needs, and adds what that
release needs beyond them (torchtitan 0.3: an attention kernel with a CPU backward).
"""

from __future__ import annotations

import functools
import importlib
import os
import resource
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule

from torchtitan_patch.version import adapter


def accelerator_available() -> bool:
    """Whether torch sees an accelerator (CUDA, ROCm, XPU, ...) on this machine."""
    return torch.accelerator.is_available()


class CpuDeviceModule:
    """The subset of the ``torch.cuda`` API torchtitan calls, answered for the host CPU."""

    def __getattr__(self, name: str) -> Any:
        # Everything torch.cpu has (synchronize, current_device, Stream, ...) passes through.
        return getattr(torch.cpu, name)

    @staticmethod
    def set_device(device: torch.device | str | int) -> None:
        """CPU ranks share one device; nothing to select."""

    @staticmethod
    def current_device() -> int:
        """An index, as ``torch.cuda.current_device`` gives (``torch.cpu``'s returns ``"cpu"``)."""
        return 0

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        return f"CPU ({os.cpu_count()} cores)"

    @staticmethod
    def get_device_properties(device: Any = None) -> Any:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return type("CpuProperties", (), {"total_memory": total, "name": CpuDeviceModule.get_device_name()})()

    @staticmethod
    def memory_stats(device: Any = None) -> dict[str, int]:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        return {"active_bytes.all.peak": rss, "reserved_bytes.all.peak": peak,
                "num_alloc_retries": 0, "num_ooms": 0}

    @staticmethod
    def reset_peak_memory_stats(device: Any = None) -> None:
        """The OS keeps the peak RSS of a process; it cannot be reset."""

    @staticmethod
    def empty_cache() -> None:
        """The CPU allocator keeps no cache to release."""


def force_sum_reductions(model: nn.Module) -> nn.Module:
    """Make every FSDP module of ``model`` reduce gradients with SUM (gloo has no PREMUL_SUM)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
    return model


def point_torchtitan_at_cpu() -> None:
    """Shim 1 and 2: every loaded torchtitan module, and ``get_device_info`` for later ones, see the CPU."""
    import torchtitan.tools.utils

    device_module = CpuDeviceModule()
    # Modules imported later (e.g. by a model's parallelize) call this at import time.
    torchtitan.tools.utils.get_device_info = lambda: ("cpu", device_module)
    for name, module in list(sys.modules.items()):
        if name.startswith("torchtitan") and module is not None:
            if getattr(module, "device_type", None) == "cuda":
                module.device_type = "cpu"
            if getattr(module, "device_module", None) is torch.cuda:
                module.device_module = device_module


def gloo_safe(parallelize_fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Shim 3 for a model's parallelize function: its FSDP modules reduce with SUM."""

    @functools.wraps(parallelize_fn)
    def wrapped(*args: Any, **kwargs: Any) -> nn.Module:
        return force_sum_reductions(parallelize_fn(*args, **kwargs))

    return wrapped


_enabled = False


def enable_cpu_mode() -> None:
    """Apply the installed torchtitan adapter's CPU mode (its ``cpu.apply``); call before its trainer
    is built. Idempotent."""
    global _enabled
    if not _enabled:
        importlib.import_module(f"torchtitan_patch.{adapter()}.cpu").apply()
        _enabled = True


def cpu_mode_enabled() -> bool:
    """Whether :func:`enable_cpu_mode` ran in this process."""
    return _enabled
