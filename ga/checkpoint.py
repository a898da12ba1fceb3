"""The run folder and its checkpoint: everything needed to continue a search exactly.

A checkpoint is plain JSON (no pickle: loading it can never run code), written atomically
after every generation: population with fitnesses, hall of fame, logbook, the random state,
the fitness cache and the configuration. Floats survive JSON exactly (repr round-trips).
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from chromosomes import write_json_atomic

CHECKPOINT_FORMAT = "gaprune.checkpoint"
CHECKPOINT_VERSION = 1


class RunError(RuntimeError):
    """A run folder that cannot be created, resumed or read; the message says which and why."""


def rng_state_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def rng_state_from_json(data: list) -> tuple:
    version, internal, gauss = data
    return version, tuple(internal), gauss


def restore_rng(data: list) -> random.Random:
    rng = random.Random()
    rng.setstate(rng_state_from_json(data))
    return rng


class RunFolder:
    """runs/<name>/: config.json, checkpoint.json, best.json and the TensorBoard logs in tb/."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.json"

    @property
    def best_path(self) -> Path:
        return self.path / "best.json"

    @property
    def board_path(self) -> Path:
        return self.path / "tb"

    def refuse_existing(self) -> None:
        """A new run never reuses a folder, finished or not."""
        if self.path.exists() and any(self.path.iterdir()):
            raise RunError(f"run folder {self.path} already exists; continue it with --resume {self.path} "
                           "or choose another --name")

    def create(self, config: dict[str, Any]) -> None:
        self.refuse_existing()
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.config_path, config)

    def read_config(self) -> dict[str, Any]:
        if not self.config_path.is_file():
            raise RunError(f"{self.path} is not a gaprune run folder (no config.json)")
        return _read_json(self.config_path)

    def write_config(self, config: dict[str, Any]) -> None:
        write_json_atomic(self.config_path, config)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        write_json_atomic(self.checkpoint_path, {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state})

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The last checkpoint, or None when the run stopped before its first generation ended."""
        if not self.checkpoint_path.is_file():
            return None
        data = _read_json(self.checkpoint_path)
        if data.get("format") != CHECKPOINT_FORMAT or data.get("version") != CHECKPOINT_VERSION:
            raise RunError(f"{self.checkpoint_path} is not a version-{CHECKPOINT_VERSION} gaprune checkpoint")
        return data


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise RunError(f"cannot read {path}: {error}") from None
