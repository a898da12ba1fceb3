"""The one place a genome becomes decoder layers: for scoring, for export and for healing.

A `Builder` holds the dense model and everything a genome needs to become modules of it:
- merge blocks are fused by the `LayerMerger` (alignment statistics on calibration text);
- narrowed layers keep the units a *ranking* puts first: each layer's key-value groups and MLP
  channels ordered once by importance on calibration text, or by what the layer's refit loses
  (`--ranking`), so every width is a prefix of it and a cut sub-layer is sliced once per
  (layer, units) and cached;
- every cut is repaired (`--repair`): narrowed sub-layers refitted, seams mapped.
A chromosome file's `units` (the units it keeps, written by the search) take the ranking's place,
so an export never needs the importance pass. The same builder serves the search, `finetune.best`
and the export, so the model written is the model scored.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
from collections import OrderedDict
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from chromosomes import Block, ChromosomeError, blocks, validate
from chromosomes.width import KINDS, LayerUnits, Ranking, Unit, reordered
from evaluators.alignment import AlignmentCache, auto_align_tokens, pair_statistics, resolved_assignment
from evaluators.families import Geometry, family_of
from evaluators.merge import PROBE_TOKENS, LayerMerger, record_layer_inputs, require_mergeable
from evaluators.models import decoder_layers
from evaluators.repair import SeamRepairer
from evaluators.surgery import LayerStack, dense_layer_types, install_stack
from evaluators.text import CalibrationSplit, text_blocks
from evaluators.units import full_geometry, layer_shape, narrowed, output_columns, span_size, unit_importance
from gaprune.files import write_json_atomic

# Memory for cut sub-layers kept for reuse: a search revisits the same widths of the same layers.
NARROWED_CACHE_BYTES = 2 * 1024**3
RANKING_FORMAT = "gaprune.units"


def calibration_split(config: Any, tokenizer: Any, model: PreTrainedModel) -> CalibrationSplit:
    """The calibration text cut as every statistic of a run reads it: the scoring windows first,
    then the windows alignment, repair, norm calibration and the ranking read."""
    text = text_blocks(config.data, tokenizer, config.seq_len, data_dir=config.data_dir)
    units = getattr(model.config, "intermediate_size", 0) or 0
    align_tokens = config.align_tokens or auto_align_tokens(units, config.seq_len)
    return CalibrationSplit.cut(text, config.score_blocks, config.tune_blocks(align_tokens), name=config.data)


class Builder:
    """Turns genomes into layer stacks of one resident model (the settings are an EvaluatorConfig's)."""

    def __init__(self, model: PreTrainedModel, tune: torch.Tensor | None, config: Any, batch_size: int):
        """`tune`: calibration windows (never the scoring ones) for alignment, repair and ranking
        (None: for genomes that need none of them)."""
        self.model = model
        self.config = config
        self._tune = tune
        self.batch_size = batch_size
        self.dense_layers = list(decoder_layers(model))
        self.dense_types = dense_layer_types(model)
        self.family = family_of(model)
        self.num_layers = len(self.dense_layers)
        units = getattr(model.config, "intermediate_size", 0) or 0
        self.align_tokens = config.align_tokens or auto_align_tokens(units, config.seq_len)
        self.align_method = resolved_assignment(config.align_method, units, next(model.parameters()).device)
        self._merger: LayerMerger | None = None
        self._repairer: SeamRepairer | None = None
        self._units: list[Unit] | None = None
        self._narrowed: OrderedDict[tuple, nn.Module] = OrderedDict()
        self._narrowed_bytes = 0

    def reset(self, batch_size: int) -> None:
        """Build again everything that holds states per batch (after running out of memory)."""
        self.batch_size = batch_size
        self._merger = self._repairer = None
        self._narrowed.clear()
        self._narrowed_bytes = 0

    # -- what the builder is made of -------------------------------------------------------------

    @property
    def tune(self) -> torch.Tensor:
        if self._tune is None:
            raise ValueError("this genome needs calibration text (merges, a repair or a ranking), "
                             "but the builder was given none")
        return self._tune

    @property
    def align_blocks(self) -> torch.Tensor:
        """The calibration windows merge alignment reads."""
        return self.tune[: -(-self.align_tokens // self.config.seq_len)]

    def merge_settings(self) -> dict[str, Any]:
        c = self.config
        settings = {"rule": c.merge_rule, "align": c.align, "align_tokens": self.align_tokens}
        # the assignment only where it is not the Hungarian method (all runs saved before the
        # option existed used it), so that those runs keep the record they resume against
        return settings | ({"assignment": self.align_method} if self.align_method != "hungarian" else {})

    @property
    def merger(self) -> LayerMerger:
        """Built on first use: alignment needs one dense forward pass that skip-only runs never pay."""
        if self._merger is None:
            c = self.config
            geometry, name = Geometry.of(self.model.config), type(self.model).__name__
            require_mergeable(self.dense_layers[0], name, self.family, geometry)
            statistics = partial(pair_statistics, self.model, self.dense_layers, self.family, geometry,
                                 self.align_blocks, self.batch_size) if c.align else None
            store = None if c.align_cache is None or not c.align else AlignmentCache(
                c.align_cache, {**self.text_identity(), "merge": self.merge_settings()})
            probes = record_layer_inputs(self.model, self.dense_layers, self.align_blocks[:1, :PROBE_TOKENS])
            self._merger = LayerMerger(self.dense_layers, statistics, geometry, self.family, c.merge_rule,
                                       cache_bytes=int(c.merge_cache_gb * 1024**3), probes=probes, model_name=name,
                                       assignment=self.align_method, store=store)
        return self._merger

    @property
    def repairer(self) -> SeamRepairer | None:
        """Built on first use: the dense states it fits to cost one forward over the repair tokens."""
        if self.config.repair == "none":
            return None
        if self._repairer is None:
            c = self.config
            self._repairer = SeamRepairer(self.model, self.dense_layers, self.tune[: c.repair_blocks], self.batch_size,
                                          self.family, c.repair_ridge, c.repair_inputs, c.repair, c.repair_min_run)
        return self._repairer

    def text_identity(self) -> dict[str, Any]:
        """What statistics from calibration text depend on besides their own settings."""
        c = self.config
        return {"model": c.model, "data": c.data, "seq_len": c.seq_len, "tokens": c.score_blocks * (c.seq_len - 1),
                "dtype": str(self.model.dtype).removeprefix("torch.")}

    def units(self) -> list[Unit]:
        """Every unit of the dense model with its importance (the ranking's source): read from the
        run's store if an actor or an earlier start wrote it, else scored on calibration text."""
        if self._units is None:
            store = None if self.config.align_cache is None else Path(self.config.align_cache)
            with _locked(store):
                self._units = self._stored_units(store)
                if self._units is None:
                    self._units = self._ranked_units()
                    if store is not None:
                        write_json_atomic(self._ranking_path(store), {
                            "format": RANKING_FORMAT, "depends_on": self._ranking_identity(),
                            "units": [[u.layer, u.kind, u.index, u.importance, u.cost] for u in self._units]})
        return self._units

    def _ranked_units(self) -> list[Unit]:
        """Importance on calibration text; with `obs`, taylor2's importances handed to each layer's
        units in the order its refit loses least by (see `removal_order`)."""
        c = self.config
        windows = -(-c.ranking_tokens // c.seq_len)
        units = unit_importance(self.model, self.tune[:windows], c.importance)
        if c.unit_ranking != "obs":
            return units
        geometry, _ = full_geometry(self.model)
        unit_columns = {"attention": span_size("query", geometry), "mlp": 1}
        return reordered(units, {(layer, kind): self.repairer.removal_order(layer, kind, unit_columns[kind])
                                 for layer in range(self.num_layers) for kind in KINDS})

    def _ranking_identity(self) -> dict[str, Any]:
        c = self.config
        refit = {"repair_tokens": c.repair_tokens, "repair_ridge": c.repair_ridge} if c.unit_ranking == "obs" else {}
        return {**self.text_identity(), "ranking": c.unit_ranking, "ranking_tokens": c.ranking_tokens, **refit}

    def _ranking_path(self, store: Path) -> Path:
        digest = hashlib.sha256(json.dumps(self._ranking_identity(), sort_keys=True).encode()).hexdigest()[:16]
        return store / f"units-{digest}.json"

    def _stored_units(self, store: Path | None) -> list[Unit] | None:
        if store is None or not self._ranking_path(store).is_file():
            return None
        data = json.loads(self._ranking_path(store).read_text())
        return [Unit(layer, kind, index, importance, cost) for layer, kind, index, importance, cost in data["units"]]

    @property
    def ranking(self) -> Ranking:
        return Ranking.of(self.units(), self.num_layers)

    # -- genome -> layers ------------------------------------------------------------------------

    def plan(self, genes: Sequence[object], units: Sequence[LayerUnits] | None = None
             ) -> tuple[tuple[Block, LayerUnits | None], ...]:
        """Per compact layer, its block and the units it keeps (None: the whole layer), from the
        chromosome file's `units` where given, else from the ranking."""
        plan = blocks(validate(genes, self.num_layers))
        if units is not None:
            if len(units) != len(plan):
                raise ChromosomeError(f"units lists {len(units)} layers but the genes keep {len(plan)}")
            return tuple((block, None if self._whole(entry) else entry) for block, entry in zip(plan, units))
        if all(block.whole for block in plan):
            return tuple((block, None) for block in plan)
        ranking = self.ranking
        return tuple((block, None if block.whole else ranking.kept(block.anchor, block.kv_heads, block.channels))
                     for block in plan)

    def _whole(self, entry: LayerUnits) -> bool:
        geometry, channels = full_geometry(self.model)
        return len(entry.kv_heads) == geometry.kv_heads and len(entry.channels) == channels

    def raw_stack(self, genes: Sequence[object], units: Sequence[LayerUnits] | None = None) -> LayerStack:
        """The genome's layers as cut (merge blocks fused, narrowed layers sliced and, with a
        repair, refitted), before any seam repair."""
        plan = self.plan(genes, units)
        modules, keys = [], []
        for block, kept in plan:
            if block.merged:
                modules.append(self.merger(block))
                keys.append(block)
            elif kept is None:
                modules.append(self.dense_layers[block.anchor])
                keys.append(block)
            else:
                key = (block.anchor, kept.kv_heads, kept.channels)
                modules.append(self._narrowed_layer(block.anchor, kept, key))
                keys.append(key)
        types = None if self.dense_types is None else tuple(self.dense_types[block.anchor] for block, _ in plan)
        return LayerStack(tuple(block for block, _ in plan), tuple(keys), tuple(modules), types)

    def _narrowed_layer(self, layer: int, kept: LayerUnits, key: tuple) -> nn.Module:
        if key in self._narrowed:
            self._narrowed.move_to_end(key)
            return self._narrowed[key]
        geometry, channels = full_geometry(self.model)
        module = narrowed(self.dense_layers[layer], kept, self.family, geometry, channels)
        if self.repairer is not None and self.config.refit:
            for kind, count, full in (("attention", len(kept.kv_heads), geometry.kv_heads),
                                      ("mlp", len(kept.channels), channels)):
                if 0 < count < full:
                    self.repairer.refit(layer, kind, module, output_columns(kind, kept, geometry))
        module.requires_grad_(False)
        self._narrowed[key] = module
        self._narrowed_bytes += _own_bytes(module, self.dense_layers[layer])
        while self._narrowed_bytes > NARROWED_CACHE_BYTES and len(self._narrowed) > 1:
            old_key, old = self._narrowed.popitem(last=False)
            self._narrowed_bytes -= _own_bytes(old, self.dense_layers[old_key[0]])
        return module

    def stack(self, genes: Sequence[object], units: Sequence[LayerUnits] | None = None) -> LayerStack:
        """The layers the genome is scored with: cut, then repaired as configured."""
        raw = self.raw_stack(genes, units)
        return raw if self.repairer is None else self.repairer.repaired(raw)

    def compact(self, genes: Sequence[object], units: Sequence[LayerUnits] | None = None) -> PreTrainedModel:
        """Cut the resident model to the genome for good, repaired as it is scored; the builder
        cannot build anything afterwards."""
        return install_stack(self.model, self.stack(genes, units))

    def kept_units(self, genes: Sequence[object]) -> tuple[LayerUnits, ...]:
        """Per compact layer, the units it keeps (all of a whole layer's), as a chromosome file records them."""
        geometry, channels = full_geometry(self.model)
        everything = LayerUnits(tuple(range(geometry.kv_heads)), tuple(range(channels)))
        return tuple(everything if kept is None else kept for _, kept in self.plan(genes))

    def shape(self):
        return layer_shape(self.model)


def _own_bytes(module: nn.Module, dense: nn.Module) -> int:
    """Bytes of the parameters a cut layer holds beyond those it shares with its dense layer."""
    shared = {id(p) for p in dense.parameters()}
    return sum(p.numel() * p.element_size() for p in module.parameters() if id(p) not in shared)


@contextmanager
def _locked(store: Path | None) -> Iterator[None]:
    """One process at a time computes what the store keeps (actors of one run share it)."""
    if store is None:
        yield
        return
    store.mkdir(parents=True, exist_ok=True)
    with open(store / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
