"""Tensor lifetimes across device streams.

The caching allocator of a stream-based device (CUDA, and others with the same model) reuses a
freed block for the next allocation on the stream that allocated it, without waiting for work
queued on other streams. A tensor produced on one stream and read on another must therefore
either stay referenced until the reader's work is done, or be recorded on the reader's stream.
"""

from __future__ import annotations

import torch


def keep_for_current_stream(tensor: torch.Tensor) -> None:
    """Keep ``tensor``'s memory from reuse until the work queued so far on the current stream
    of its device is done (a no-op for devices without streams, such as the CPU)."""
    device = tensor.device
    if device.type == "cpu" or tensor.numel() == 0:
        return
    module = torch.get_device_module(device.type)
    if hasattr(module, "current_stream"):
        tensor.record_stream(module.current_stream(device))
