"""`best.json`: a chromosome together with the model it fits and how its fitness was measured.

The file is what the GA hands to the finetuner, so loading it checks everything the
finetuner would otherwise trip over later: format, version, genes, and the model's depth.
A genome with widths carries `units`: per kept layer, the key-value heads and MLP channels it
keeps, resolved from the search's ranking, so that the file alone rebuilds the model.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from chromosomes.genome import ChromosomeError, LayerGene, blocks, layers_removed, to_json, validate
from chromosomes.width import LayerUnits, check_units
from gaprune.files import write_json_atomic

FORMAT = "gaprune.chromosome"
FORMAT_VERSION = 1
MEASUREMENT_KEYS = {"perplexity": float, "nll": float, "tokens": int, "seq_len": int, "data": str}


@dataclass(frozen=True)
class ChromosomeRecord:
    genes: tuple[LayerGene, ...]
    model: str  # the model spec it was searched on: a default id, a folder or a GGUF file
    num_layers: int
    fitness: dict[str, Any] | None = None  # perplexity, nll, tokens, seq_len, data, calibration
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance (run name, seed, ...)
    units: tuple[LayerUnits, ...] | None = None  # width plan: per kept layer, the units it keeps

    def __post_init__(self) -> None:
        object.__setattr__(self, "genes", validate(self.genes, self.num_layers))
        if self.units is not None:
            check_units(self.units, blocks(self.genes))
        if self.fitness is not None:
            _check_measurement(self.fitness)

    @property
    def removed(self) -> int:
        return layers_removed(self.genes)

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["genes"] = to_json(self.genes)
        if self.units is None:
            del body["units"]  # a depth-only chromosome reads as it always did
        else:
            body["units"] = [entry.to_dict() for entry in self.units]
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **body}

    @classmethod
    def from_dict(cls, data: Any, source: str = "chromosome") -> "ChromosomeRecord":
        if not isinstance(data, dict):
            raise ChromosomeError(f"{source}: expected a JSON object, found {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ChromosomeError(f"{source}: not a gaprune chromosome file (format={data.get('format')!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise ChromosomeError(
                f"{source}: format_version {data.get('format_version')!r} is not supported "
                f"(this gaprune reads version {FORMAT_VERSION})"
            )
        missing = [key for key in ("genes", "model", "num_layers") if key not in data]
        if missing:
            raise ChromosomeError(f"{source}: missing field(s) {', '.join(missing)}")
        if not isinstance(data["genes"], list):
            raise ChromosomeError(f"{source}: 'genes' must be a list of 0, 1, 2 and [heads, channels]")
        if not isinstance(data["num_layers"], int) or isinstance(data["num_layers"], bool):
            raise ChromosomeError(f"{source}: 'num_layers' must be an integer")
        if not isinstance(data["model"], str) or not data["model"]:
            raise ChromosomeError(f"{source}: 'model' must be a non-empty string")
        units = data.get("units")
        if units is not None and not isinstance(units, list):
            raise ChromosomeError(f"{source}: 'units' must be a list with one entry per kept layer")
        try:
            return cls(
                genes=tuple(data["genes"]),
                model=data["model"],
                num_layers=data["num_layers"],
                fitness=data.get("fitness"),
                extra=dict(data.get("extra") or {}),
                units=None if units is None else tuple(LayerUnits.from_dict(e, i) for i, e in enumerate(units)),
            )
        except ChromosomeError as error:
            raise ChromosomeError(f"{source}: {error}") from None

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path, num_layers: int | None = None) -> "ChromosomeRecord":
        """Read a chromosome file; with `num_layers`, also refuse one made for another depth."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as error:
            raise ChromosomeError(f"cannot read chromosome file {path}: {error.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ChromosomeError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
        record = cls.from_dict(data, source=str(path))
        if num_layers is not None and record.num_layers != num_layers:
            raise ChromosomeError(
                f"{path}: chromosome was made for a model with {record.num_layers} decoder layers, "
                f"but this model has {num_layers}"
            )
        return record


def _check_measurement(fitness: Any) -> None:
    if not isinstance(fitness, dict):
        raise ChromosomeError("'fitness' must be an object")
    for key, kind in MEASUREMENT_KEYS.items():
        if key not in fitness:
            raise ChromosomeError(f"'fitness' lacks '{key}'")
        value = fitness[key]
        if kind is float and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
            raise ChromosomeError(f"fitness '{key}' must be a number, got {value!r}")
        if kind is float and not math.isfinite(value):
            raise ChromosomeError(f"fitness '{key}' must be finite, got {value!r}")
        if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
            raise ChromosomeError(f"fitness '{key}' must be an integer, got {value!r}")
        if kind is str and not isinstance(value, str):
            raise ChromosomeError(f"fitness '{key}' must be a string, got {value!r}")
