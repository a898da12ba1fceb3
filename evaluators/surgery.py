"""Layer surgery: run a stack of layers on the resident model for a while, or install it for good.

Both paths go through `install_layers`, so a temporary view and a saved compact model run
exactly the same modules in the same order and give identical logits (`evaluators.build`
turns a genome into the stack). Transformers 5.x keeps the layer count in four places (the layer
list, each attention's `layer_idx`, the config's `layer_types` and `num_hidden_layers`, and
Qwen's `has_sliding_layers`); they move together here.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Hashable, Iterator, Sequence

from torch import nn
from transformers import PreTrainedModel

from chromosomes import Block


@dataclass(frozen=True)
class LayerStack:
    """The decoder layers a chromosome asks for, with the attention type each one keeps."""

    plan: tuple[Block, ...]  # the chromosome's blocks, in order
    keys: tuple[Hashable, ...]  # identifies each module: equal key prefixes mean the same computation
    modules: tuple[nn.Module, ...]
    layer_types: tuple[str, ...] | None


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


def install_stack(model: PreTrainedModel, stack: LayerStack) -> PreTrainedModel:
    """Make a resolved (possibly repaired) stack the model's layers for good."""
    install_layers(model, stack.modules, stack.layer_types)
    return model
