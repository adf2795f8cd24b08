"""torchtitan 0.2.2's text dataloader behind a guard that refuses to reshard its state.

The dataloader state in a checkpoint belongs to one data-parallel layout (each DP rank
saves where it is in its own slice of the data). Loading it under another DP degree would
silently replay or skip data, so :class:`ReshardGuardDataLoader` raises instead and says how
to skip it explicitly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torchtitan.components.dataloader import BaseDataLoader, ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import JobConfig
from torchtitan.hf_datasets.text_datasets import build_text_dataloader


class ReshardGuardDataLoader(BaseDataLoader):
    """torchtitan's text dataloader, whose checkpoint state only loads under the same DP degree."""

    def __init__(self, inner: ParallelAwareDataloader) -> None:
        self.inner = inner

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        return iter(self.inner)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("world_size") if state_dict else None
        if saved is not None and saved != self.inner.dp_world_size:
            raise ValueError(
                f"the checkpoint's dataloader state was saved with data-parallel degree {saved}, this run "
                f"has {self.inner.dp_world_size}; dataloader state does not reshard across DP degrees. "
                f"Model and optimizer state do: to resume them and restart the data, pass "
                f"--checkpoint.exclude_from_loading dataloader"
            )
        self.inner.load_state_dict(state_dict)


def build_dataloader(
    dp_world_size: int, dp_rank: int, tokenizer: BaseTokenizer, job_config: JobConfig, infinite: bool = True
) -> ReshardGuardDataLoader:
    """torchtitan's text dataloader behind :class:`ReshardGuardDataLoader`."""
    return ReshardGuardDataLoader(
        build_text_dataloader(dp_world_size, dp_rank, tokenizer, job_config, infinite=infinite)
    )
