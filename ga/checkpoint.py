"""The run folder and its checkpoint: everything needed to continue a search exactly.

Everything is plain JSON (no pickle: loading it can never run code); floats survive JSON
exactly (repr round-trips). After every generation:
- what grows with the run is appended, one JSON object a line: `generations.jsonl` (each
  generation's logbook record and history entry) and `evaluations.jsonl` (each new fitness);
- then `checkpoint.json` is written atomically with what does not grow (population, hall of
  fame, random state, counters, the configuration) and how many lines of each log it covers.
So a generation costs the same to save at generation 500 as at generation 1. Lines past what
the checkpoint covers (a run killed between the two writes) are ignored, and dropped before
the resumed run appends. Version-1 checkpoints, which held the logs inline, still load.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from chromosomes import from_string
from ga.problem import Problem
from gaprune.files import write_json_atomic

CHECKPOINT_FORMAT = "gaprune.checkpoint"
CHECKPOINT_VERSION = 2
# Parts of the saved state that grow with the run, and the append-only log each goes to.
GROWING = {"logbook": "generations", "history": "generations", "cache": "evaluations", "screen_cache": "evaluations"}


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
    """runs/<name>/: config.json, checkpoint.json with generations.jsonl and evaluations.jsonl,
    best.json and the TensorBoard logs in tb/."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._logged: dict[str, int] | None = None  # entries of each growing part the checkpoint covers
        self._trimmed = False  # whether this process has cut the logs back to the checkpoint

    def log_path(self, name: str) -> Path:
        return self.path / f"{name}.jsonl"

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
                           "or choose another --out")

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

    def save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Append the new log lines, then write the checkpoint that covers them.

        `checkpoint["state"]` is the whole search state. Its growing parts only ever grow (lists,
        and dicts that keep insertion order), so what is not logged yet is what follows the
        logged count of each.
        """
        state = checkpoint["state"]
        logged = self._logs_ready()
        new = {
            "generations": [{"logbook": record, "history": entry} for record, entry in
                            zip(state["logbook"][logged["logbook"]:], state["history"][logged["logbook"]:])],
            "evaluations": [{"key": key, "screen": kind == "screen_cache", "fitness": fitness}
                            for kind in ("cache", "screen_cache")
                            for key, fitness in list(state[kind].items())[logged[kind]:]],
        }
        for log, lines in new.items():
            if lines:
                with self.log_path(log).open("a") as handle:
                    handle.write("".join(json.dumps(line) + "\n" for line in lines))
                    handle.flush()
                    os.fsync(handle.fileno())
        logged.update({"logbook": len(state["logbook"]), "cache": len(state["cache"]),
                       "screen_cache": len(state["screen_cache"])})
        bounded = {key: value for key, value in state.items() if key not in GROWING}
        write_json_atomic(self.checkpoint_path, {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                                                 **checkpoint, "state": bounded, "logged": dict(logged)})

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The last checkpoint with its logs read back into the state (as version 1 held them),
        or None when the run stopped before its first generation ended. Reading changes nothing."""
        if not self.checkpoint_path.is_file():
            return None
        data = _read_json(self.checkpoint_path)
        if data.get("format") != CHECKPOINT_FORMAT or data.get("version") not in (1, CHECKPOINT_VERSION):
            raise RunError(f"{self.checkpoint_path} is not a gaprune checkpoint of version 1 or {CHECKPOINT_VERSION}")
        if data["version"] == 1:
            self._logged = {"logbook": 0, "cache": 0, "screen_cache": 0}  # its next save logs everything
            return data
        logged = self._logged = dict(data["logged"])
        state = data["state"]
        state.update({"logbook": [], "history": [], "cache": {}, "screen_cache": {}})
        for line in self._read_log("generations", logged["logbook"]):
            state["logbook"].append(line["logbook"])
            state["history"].append(line["history"])
        for line in self._read_log("evaluations", logged["cache"] + logged["screen_cache"]):
            state["screen_cache" if line["screen"] else "cache"][line["key"]] = line["fitness"]
        return data

    def scored(self) -> dict[str, dict[str, Any]]:
        """Every genome the run fully scored within its budget, with its fitness: what benchmarks
        read to look past the run's single pick (screenings left out, and the seeding scans that
        remove a single layer or sub-layer)."""
        checkpoint = self.load_checkpoint()
        if checkpoint is None:
            raise RunError(f"{self.path} holds no finished generation")
        problem = Problem.recorded(checkpoint["removed"], checkpoint["definition"])
        return {key: fitness for key, fitness in checkpoint["state"]["cache"].items()
                if problem.feasible(from_string(key))}

    def _line_counts(self) -> dict[str, int]:
        logged = self._logged or {}
        return {"generations": logged.get("logbook", 0),
                "evaluations": logged.get("cache", 0) + logged.get("screen_cache", 0)}

    def _read_log(self, log: str, count: int) -> list[dict[str, Any]]:
        """The first `count` lines of a log (lines after them are not checkpointed)."""
        if count == 0:
            return []
        try:
            with self.log_path(log).open() as handle:
                lines = [json.loads(text) for _, text in zip(range(count), handle)]
        except (OSError, json.JSONDecodeError) as error:
            raise RunError(f"cannot read {self.log_path(log)}: {error}") from None
        if len(lines) < count:
            raise RunError(f"{self.log_path(log)} has {len(lines)} lines but the checkpoint covers {count}")
        return lines

    def _logs_ready(self) -> dict[str, int]:
        """Counts of checkpointed entries, with each log cut back to the lines they cover (a
        generation killed before its checkpoint leaves lines that must go)."""
        if self._logged is None:  # this process has not loaded the checkpoint: a new run, or a copy
            self._logged = {"logbook": 0, "cache": 0, "screen_cache": 0}
            if self.checkpoint_path.is_file():
                self.load_checkpoint()
        if not self._trimmed:
            for log, count in self._line_counts().items():
                path = self.log_path(log)
                if path.is_file():
                    with path.open("rb+") as handle:
                        for _ in range(count):
                            handle.readline()
                        handle.truncate()
            self._trimmed = True
        return self._logged


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise RunError(f"cannot read {path}: {error}") from None
