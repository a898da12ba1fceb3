"""The compact model a chromosome file describes, as the search scored it.

Cut by the evaluators' own `Builder` with the merge, width and repair settings the search used
(saved in best.json), so that the model healed, exported or evaluated is the very model the GA
scored. The file and the base model's depth are checked before any weights load.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from chromosomes import ChromosomeError, ChromosomeRecord, Gene
from evaluators.build import Builder, calibration_split
from evaluators.config import EvaluatorConfig
from evaluators.models import load_model, model_folder


class Placement(Protocol):
    """Where and how this machine builds the model (a command's settings), and the repair that
    overrides the recorded one when not None."""

    dtype: str
    device: str
    data_dir: str | None
    repair: str | None


def base_model_config(spec: str) -> dict[str, Any]:
    """The base model's config.json: its depth and context length, read without loading weights."""
    return json.loads((model_folder(spec) / "config.json").read_text())


def load_chromosome(path: str | Path, spec: str | None) -> tuple[ChromosomeRecord, str]:
    """The chromosome and the model spec it is applied to, refusing a chromosome made for another depth."""
    record = ChromosomeRecord.load(path)
    spec = spec or record.model
    depth = base_model_config(spec).get("num_hidden_layers")
    if record.num_layers != depth:
        raise ChromosomeError(
            f"{path}: chromosome was made for a model with {record.num_layers} decoder layers, "
            f"but {spec} has {depth}"
        )
    return record, spec


def surgery_settings(record: ChromosomeRecord, spec: str, config: Placement) -> EvaluatorConfig:
    """The search's merge and repair settings (saved in best.json; defaults for a hand-written
    file), on this machine's model, device and data, with --repair overriding the recorded one.
    The search's alignments are read from its run folder while that folder is there."""
    saved = record.extra.get("evaluator")
    if saved is not None and not isinstance(saved, dict):
        raise ChromosomeError("the chromosome file's extra.evaluator must be an object of evaluator settings")
    searched = EvaluatorConfig.from_saved(saved) if saved else EvaluatorConfig(model=record.model)
    store = searched.align_cache if searched.align_cache and Path(searched.align_cache).is_dir() else None
    return replace(searched.with_repair(config.repair or searched.repair), model=spec, dtype=config.dtype,
                   device=config.device, threads=0, data_dir=config.data_dir, align_cache=store)


def needs_calibration_text(record: ChromosomeRecord, settings: EvaluatorConfig) -> bool:
    """Merging (alignment statistics), repairs (least-squares statistics) and a width genome without
    its units (the ranking) read the calibration text."""
    return Gene.MERGE in record.genes or settings.repair != "none" or \
        record.units is None and any(isinstance(gene, tuple) for gene in record.genes)


def build_compact(
    record: ChromosomeRecord, spec: str, config: Placement
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base model and cut it to the chromosome (merged, narrowed to its units and
    repaired as the search did)."""
    settings = surgery_settings(record, spec, config)
    model, tokenizer = load_model(spec, config.dtype, config.device)
    tune = calibration_split(settings, tokenizer, model).tune if needs_calibration_text(record, settings) else None
    builder = Builder(model, tune, settings, settings.batch_size)
    return builder.compact(record.genes, record.units), tokenizer
