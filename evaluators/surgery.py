"""Layer surgery: run a chromosome on the resident model, or cut a compact model for export.

Both paths go through `install_layers`, so a temporary view and a saved compact model run
exactly the same modules in the same order and give identical logits. Transformers 5.x keeps
the layer count in four places (the layer list, each attention's `layer_idx`, the config's
`layer_types` and `num_hidden_layers`, and Qwen's `has_sliding_layers`); they move together here.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Hashable, Iterator, Sequence

from torch import nn
from transformers import PreTrainedModel

from chromosomes import Block, ChromosomeError, blocks, validate
from evaluators.models import decoder_layers

Fuser = Callable[[Block], nn.Module]


@dataclass(frozen=True)
class LayerStack:
    """The decoder layers a chromosome asks for, with the attention type each one keeps."""

    plan: tuple[Block, ...]  # the chromosome's blocks, in order
    keys: tuple[Hashable, ...]  # identifies each module: equal key prefixes mean the same computation
    modules: tuple[nn.Module, ...]
    layer_types: tuple[str, ...] | None


def layer_stack(
    dense_layers: Sequence[nn.Module], dense_types: Sequence[str] | None,
    genes: Sequence[int], fuse: Fuser | None = None,
) -> LayerStack:
    """Resolve a chromosome to modules: dense layers as they are, merge blocks through `fuse`."""
    genes = validate(genes, len(dense_layers))
    plan = blocks(genes)
    modules = []
    for block in plan:
        if block.merged and fuse is None:
            raise ChromosomeError("chromosome has MERGE genes but this evaluator was built without merging")
        modules.append(fuse(block) if block.merged else dense_layers[block.anchor])
    types = None if dense_types is None else tuple(dense_types[block.anchor] for block in plan)
    return LayerStack(plan, plan, tuple(modules), types)


def install_layers(model: PreTrainedModel, modules: Sequence[nn.Module], layer_types: Sequence[str] | None) -> None:
    """Make `modules` the model's decoder layers and renumber everything that counts them."""
    inner = model.model
    inner.layers = nn.ModuleList(modules)
    for position, module in enumerate(modules):
        for sub in module.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = position
    config = model.config
    config.num_hidden_layers = len(modules)
    if layer_types is not None:
        config.layer_types = list(layer_types)
        if hasattr(inner, "has_sliding_layers"):
            inner.has_sliding_layers = "sliding_attention" in config.layer_types


@contextmanager
def layer_view(model: PreTrainedModel, modules: Sequence[nn.Module], layer_types: Sequence[str] | None) -> Iterator[PreTrainedModel]:
    """Run the model with other decoder layers for a while, copying no weights, then restore it exactly."""
    inner, config = model.model, model.config
    saved_layers = inner.layers
    saved_config = (config.num_hidden_layers, getattr(config, "layer_types", None))
    saved_sliding = getattr(inner, "has_sliding_layers", None)
    touched = [sub for module in modules for sub in module.modules()
               if isinstance(getattr(sub, "layer_idx", None), int)]
    saved_indices = [sub.layer_idx for sub in touched]
    try:
        install_layers(model, modules, layer_types)
        yield model
    finally:
        inner.layers = saved_layers
        config.num_hidden_layers, layer_types_before = saved_config
        if layer_types_before is not None:
            config.layer_types = layer_types_before
        if saved_sliding is not None:
            inner.has_sliding_layers = saved_sliding
        for sub, index in zip(touched, saved_indices):
            sub.layer_idx = index


def dense_layer_types(model: PreTrainedModel) -> tuple[str, ...] | None:
    types = getattr(model.config, "layer_types", None)
    return None if types is None else tuple(types)


def compact_model(model: PreTrainedModel, genes: Sequence[int], fuse: Fuser | None = None) -> PreTrainedModel:
    """Cut the model down to the chromosome for good (fused layers become ordinary layers)."""
    layers = list(decoder_layers(model))
    return install_stack(model, layer_stack(layers, dense_layer_types(model), genes, fuse))


def install_stack(model: PreTrainedModel, stack: LayerStack) -> PreTrainedModel:
    """Make a resolved (possibly repaired) stack the model's layers for good."""
    install_layers(model, stack.modules, stack.layer_types)
    return model
