"""Language-modelling text by name, tokenized once and cut into fixed-length blocks.

Named sets resolve to a local copy first (a folder laid out like `shared/data`, given by
`--data-dir` or $GAPRUNE_DATA_DIR) and otherwise to the Hugging Face hub through `datasets`.
Three texts, three roles:
  calibration  search fitness and every statistic fitted from text (repair, alignment, norms):
               the first half of WikiText-2 (tokenized) validation;
  dev          choosing defaults and comparing variants: the second half of that file and
               PTB validation, never seen by a search;
  test         reported figures only: WikiText-2 raw test and PTB test.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from evaluators.models import cache_dir
from gaprune.files import write_atomic



class TextError(ValueError):
    """Text that cannot be found or is too short for what was asked of it."""


@dataclass(frozen=True)
class TextSource:
    local: str | None  # file under the data folder
    hub: tuple[str, str, str, str] | None  # datasets path, config, split, column
    joiner: str  # how rows are joined into one running text
    description: str
    half: int | None = None  # 0 or 1: only the first or second half of the rows

TEXTS: dict[str, TextSource] = {
    "wikitext2:test": TextSource(
        "wikitext2_raw/wiki.test.raw", ("wikitext", "wikitext-2-raw-v1", "test", "text"), "\n\n",
        "WikiText-2 raw test split (the standard perplexity benchmark text)"),
    "wikitext2:validation": TextSource(
        None, ("wikitext", "wikitext-2-raw-v1", "validation", "text"), "\n\n",
        "WikiText-2 raw validation split (hub only)"),
    "wikitext2-tok:test": TextSource(
        "wikitext2_tokenized/test.txt", ("wikitext", "wikitext-2-v1", "test", "text"), "\n",
        "WikiText-2 v1 tokenized test split (with <unk>)"),
    "wikitext2-tok:validation": TextSource(
        "wikitext2_tokenized/valid.txt", ("wikitext", "wikitext-2-v1", "validation", "text"), "\n",
        "WikiText-2 v1 tokenized validation split"),
    "wikitext2-tok:calib": TextSource(
        "wikitext2_tokenized/valid.txt", ("wikitext", "wikitext-2-v1", "validation", "text"), "\n",
        "first half of the WikiText-2 v1 tokenized validation rows: the calibration text", half=0),
    "wikitext2-tok:dev": TextSource(
        "wikitext2_tokenized/valid.txt", ("wikitext", "wikitext-2-v1", "validation", "text"), "\n",
        "second half of the WikiText-2 v1 tokenized validation rows: a dev text", half=1),
    "ptb:test": TextSource(
        "ptb/ptb.test.txt", ("ptb_text_only", "penn_treebank", "test", "sentence"), "\n",
        "Penn Treebank test split"),
    "ptb:validation": TextSource(
        "ptb/ptb.valid.txt", ("ptb_text_only", "penn_treebank", "validation", "sentence"), "\n",
        "Penn Treebank validation split"),
}


def default_data_dir() -> Path | None:
    value = os.environ.get("GAPRUNE_DATA_DIR")
    return Path(value) if value else None


def load_text(name: str, data_dir: str | Path | None = None) -> str:
    """The running text of a named set, or of a local .txt file given by path."""
    if name not in TEXTS:
        path = Path(name).expanduser()
        if path.is_file():
            return path.read_text(encoding="utf-8")
        raise TextError(f"unknown text {name!r}: use one of {', '.join(TEXTS)} or a path to a text file")
    source = TEXTS[name]
    folder = Path(data_dir) if data_dir is not None else default_data_dir()
    if source.local and folder is not None and (folder / source.local).is_file():
        rows = (folder / source.local).read_text(encoding="utf-8").splitlines()
    elif source.hub is None:
        raise TextError(f"{name} has no local copy and is only on the hub")
    else:
        rows = _load_from_hub(name, source, folder)
    if source.half is not None:
        middle = len(rows) // 2
        rows = rows[:middle] if source.half == 0 else rows[middle:]
    return source.joiner.join(rows)


def _load_from_hub(name: str, source: TextSource, folder: Path | None) -> list[str]:
    import datasets  # imported here: a local copy needs none of its start-up cost

    path, config, split, column = source.hub
    try:
        rows = datasets.load_dataset(path, config, split=split)[column]
    except Exception as error:  # datasets raises many kinds: connection, missing config, ...
        where = f"{folder / source.local}" if folder and source.local else "no --data-dir given"
        raise TextError(
            f"cannot load {name}: no local copy ({where}) and the hub is unreachable ({type(error).__name__}). "
            "Point --data-dir (or $GAPRUNE_DATA_DIR) at a folder laid out like shared/data."
        ) from None
    return list(rows)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else f"{tokenizer.name_or_path}:{len(tokenizer)}"
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def token_ids(text: str, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Tokenize a running text once; later calls read the ids from the cache."""
    key = hashlib.sha256(f"{tokenizer_fingerprint(tokenizer)}\0{text}".encode()).hexdigest()[:24]
    path = cache_dir() / "tokens" / f"{key}.npy"
    if path.is_file():
        return torch.from_numpy(np.load(path))
    ids = np.asarray(tokenizer(text, verbose=False)["input_ids"], dtype=np.int64)
    write_atomic(path, lambda stream: np.save(stream, ids))
    return torch.from_numpy(ids)


def to_blocks(ids: torch.Tensor, seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seq_len] of the running ids (the tail shorter than one window is dropped)."""
    if seq_len < 2:
        raise TextError(f"seq_len must be at least 2, got {seq_len}")
    count = ids.numel() // seq_len
    if max_blocks is not None:
        count = min(count, max_blocks)
    if count == 0:
        raise TextError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: count * seq_len].view(count, seq_len)


def text_blocks(
    name: str, tokenizer: PreTrainedTokenizerBase, seq_len: int,
    max_tokens: int | None = None, data_dir: str | Path | None = None,
) -> torch.Tensor:
    """Blocks of a named text, at most `max_tokens` tokens in all (the standard evaluation protocol)."""
    ids = token_ids(load_text(name, data_dir), tokenizer)
    return to_blocks(ids, seq_len, None if max_tokens is None else max(1, max_tokens // seq_len))


@dataclass(frozen=True)
class CalibrationSplit:
    """Disjoint block sets cut from the calibration text: scoring, and norm calibration / alignment."""

    score: torch.Tensor  # [n_score, seq_len]: fitness is measured here
    tune: torch.Tensor  # [n_tune, seq_len]: RMSNorm calibration and merge alignment statistics

    @classmethod
    def cut(cls, blocks: torch.Tensor, n_score: int, n_tune: int, name: str = "text") -> "CalibrationSplit":
        needed = n_score + n_tune
        if blocks.shape[0] < needed:
            raise TextError(
                f"{name} gives {blocks.shape[0]} blocks of {blocks.shape[1]} tokens, but {n_score} scoring "
                f"and {n_tune} calibration blocks were asked for ({needed * blocks.shape[1]} tokens)"
            )
        return cls(score=blocks[:n_score], tune=blocks[n_score:needed])
