"""Offline text data for torchtitan: a local-files dataset.

The dataset ``local_text`` (``training.dataset`` on torchtitan 0.2.2, ``dataloader.dataset``
on 0.3) reads plain text from the dataset path (``training.dataset_path``,
``dataloader.dataset_path``): a
``.txt`` file (one document per non-empty line), a ``.jsonl`` file (one ``{"text": ...}``
object per line), or a directory of such files (read in sorted order). Without a path it
reads the corpus shipped in ``torchtitan_patch/assets/corpus``, so the debug models train
with no network.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from datasets import Dataset
from torchtitan.hf_datasets import DatasetConfig
from torchtitan.hf_datasets.text_datasets import DATASETS

from torchtitan_patch.version import adapter

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


def _path_field() -> str:
    """Where the installed torchtitan release takes the dataset path."""
    return {"v0_2": "training.dataset_path", "v0_3": "dataloader.dataset_path"}[adapter()]


def load_local_text(path: str) -> Dataset:
    """Read every document under ``path`` into an in-memory (map-style, resumable) dataset."""
    root = Path(path)
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.suffix in (".txt", ".jsonl"))
    elif root.is_file():
        files = [root]
    else:
        raise FileNotFoundError(
            f"{_path_field()}={path!r} does not exist; for the dataset {DATASET_NAME!r} "
            f"give a .txt file (one document per line), a .jsonl file ({{\"text\": ...}} per line) "
            f"or a directory of them"
        )
    texts = [doc for file in files for doc in _documents(file)]
    if not texts:
        raise ValueError(f"{_path_field()}={path!r} holds no documents (.txt or .jsonl lines)")
    return Dataset.from_dict({"text": texts})


def register_dataset() -> None:
    """Make ``local_text`` a torchtitan dataset name (its registry is a module-level dict)."""
    DATASETS.setdefault(
        DATASET_NAME,
        DatasetConfig(path=str(DEFAULT_CORPUS), loader=load_local_text, sample_processor=lambda s: s["text"]),
    )

