"""Offline text data for torchtitan: a local-files dataset and a dataloader that refuses to reshard.

``training.dataset = "local_text"`` reads plain text from ``training.dataset_path``: a
``.txt`` file (one document per non-empty line), a ``.jsonl`` file (one ``{"text": ...}``
object per line), or a directory of such files (read in sorted order). Without a path it
reads the corpus shipped in ``torchtitan_patch/assets/corpus``, so the debug models train
with no network.

The dataloader state in a checkpoint belongs to one data-parallel layout (each DP rank
saves where it is in its own slice of the data). Loading it under another DP degree would
silently replay or skip data, so :class:`ReshardGuardDataLoader` raises instead and says how
to skip it explicitly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torchtitan.components.dataloader import BaseDataLoader, ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import JobConfig
from torchtitan.hf_datasets import DatasetConfig
from torchtitan.hf_datasets.text_datasets import DATASETS, build_text_dataloader

DATASET_NAME = "local_text"
DEFAULT_CORPUS = Path(__file__).resolve().parent / "assets" / "corpus" / "stories.txt"


def _documents(file: Path) -> Iterator[str]:
    with file.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if file.suffix == ".jsonl":
                try:
                    yield json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{file}:{number}: expected a JSON object with a 'text' field") from e
            else:
                yield line


def load_local_text(path: str) -> Dataset:
    """Read every document under ``path`` into an in-memory (map-style, resumable) dataset."""
    root = Path(path)
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.suffix in (".txt", ".jsonl"))
    elif root.is_file():
        files = [root]
    else:
        raise FileNotFoundError(
            f"training.dataset_path={path!r} does not exist; for training.dataset={DATASET_NAME!r} "
            f"give a .txt file (one document per line), a .jsonl file ({{\"text\": ...}} per line) "
            f"or a directory of them"
        )
    texts = [doc for file in files for doc in _documents(file)]
    if not texts:
        raise ValueError(f"training.dataset_path={path!r} holds no documents (.txt or .jsonl lines)")
    return Dataset.from_dict({"text": texts})


def register_dataset() -> None:
    """Make ``local_text`` a torchtitan dataset name (its registry is a module-level dict)."""
    DATASETS.setdefault(
        DATASET_NAME,
        DatasetConfig(path=str(DEFAULT_CORPUS), loader=load_local_text, sample_processor=lambda s: s["text"]),
    )


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
