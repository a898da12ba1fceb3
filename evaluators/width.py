"""Width pruning on the model: score every attention and MLP unit, cut units out, save and reload.

An attention unit is one key-value head with the `group_size` query heads that read it (their
rows of q_proj, the head's rows of k_proj and v_proj, the query heads' columns of o_proj, their
biases and all-head q/k norm entries), so every layer keeps its query:key-value ratio exactly.
An MLP unit is one intermediate channel (a row of gate_proj and up_proj, a column of down_proj).
The layer family's roles say where those live, so fused q/k/v or gate/up matrices are cut the
same way.

Importance of a unit is the sum over its weights of a per-weight score, from calibration text:
- taylor:  |w * dL/dw|, the gradient summed over batches (first-order Taylor);
- taylor2: w^2 * F / 2 with F the diagonal Fisher, the squared gradient summed over batches;
- wanda:   |w| * ||x||, x the input of w's column over all tokens (no gradients).
Accumulators are fp32 on the device or on the CPU (`accumulate="cpu"`) when the device is short
of memory.

A layer left with no channel has its MLP replaced by a module that adds nothing; a layer left
with nothing is removed (selection keeps a layer's last key-value head while it has an MLP).
A plan whose layers all have one width
exports as a plain Hugging Face folder; any other is saved as safetensors with its widths and
rebuilt by `load_width_pruned`, no pickle and no remote code.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from chromosomes.width import LayerUnits, Unit
from evaluators.families import Geometry, LayerFamily, family_of
from evaluators.models import decoder_layers
from evaluators.surgery import dense_layer_types, install_layers

IMPORTANCE = ("taylor", "taylor2", "wanda")
WIDTHS_FILE = "gaprune_widths.json"


class WidthError(ValueError):
    """The model or the plan cannot be width-pruned this way; the message says why."""


@dataclass(frozen=True)
class Slice:
    """Where a unit's parameters lie in one role: along `dim`, `span` ("query", "kv", "channel") wide."""

    role: str
    dim: int
    span: str


UNIT_SLICES = {
    "attention": (Slice("q", 0, "query"), Slice("k", 0, "kv"), Slice("v", 0, "kv"), Slice("o", 1, "query"),
                  Slice("q_norm", 0, "query"), Slice("k_norm", 0, "kv")),
    "mlp": (Slice("gate", 0, "channel"), Slice("up", 0, "channel"), Slice("down", 1, "channel")),
}


class EmptyMLP(nn.Module):
    """The MLP of a layer that kept no channel: it adds nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def check_prunable(model: PreTrainedModel) -> LayerFamily:
    family = family_of(model)
    if family.experts:
        raise WidthError(f"width pruning is not supported for {type(model).__name__}: its MLP is a mixture of experts")
    return family


def full_geometry(model: PreTrainedModel) -> tuple[Geometry, int]:
    """Head layout and MLP width of an unpruned layer of this model."""
    return Geometry.of(model.config), model.config.intermediate_size


def span_size(span: str, geometry: Geometry) -> int:
    return {"query": geometry.group_size * geometry.head_dim, "kv": geometry.head_dim, "channel": 1}[span]


def _slices(roles: dict[str, torch.Tensor], kind: str, geometry: Geometry, units: int):
    """(role.kind name, dim, span) of each tensor a unit of `kind` owns a contiguous slice of.

    Biases go with their rows; output biases (o, down) and per-head q/k norms belong to no unit.
    """
    for s in UNIT_SLICES[kind]:
        size = span_size(s.span, geometry)
        for part in ("weight", "bias"):
            name = f"{s.role}.{part}"
            if name not in roles or (part == "bias" and s.dim == 1):
                continue
            if roles[name].shape[s.dim if part == "weight" else 0] == size * units:
                yield name, s.dim if part == "weight" else 0, size


def layer_params(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter.data for name, parameter in layer.named_parameters()}


def unit_table(layers: Sequence[nn.Module], scores: Sequence[dict[str, torch.Tensor]], family: LayerFamily,
               geometry: Geometry, channels: int) -> list[Unit]:
    """Every unit of every layer with its importance (its weights' scores summed) and parameter cost."""
    table = []
    for position, (layer, layer_scores) in enumerate(zip(layers, scores)):
        weights = family.to_roles(layer_params(layer), geometry)
        roles = family.to_roles(layer_scores, geometry)
        for kind, count in (("attention", geometry.kv_heads), ("mlp", channels)):
            importance = torch.zeros(count, dtype=torch.float64)
            cost = 0
            for name, dim, size in _slices(weights, kind, geometry, count):
                importance += roles[name].double().movedim(dim, 0).reshape(count, -1).sum(1)
                cost += weights[name].numel() // count
            table += [Unit(position, kind, index, float(importance[index]), cost) for index in range(count)]
    return table


def calibration_batches(blocks: torch.Tensor, batch_size: int, device: torch.device) -> list[torch.Tensor]:
    return [blocks[s:s + batch_size].to(device) for s in range(0, blocks.shape[0], batch_size)]


def gradient_scores(model: PreTrainedModel, blocks: torch.Tensor, batch_size: int, squared: bool,
                    accumulate: torch.device | None = None) -> list[dict[str, torch.Tensor]]:
    """Per layer and parameter, |w * sum of gradients| (taylor) or w^2 * sum of squared gradients / 2 (taylor2)."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    accumulate = accumulate or device
    model.requires_grad_(False)
    for layer in layers:
        layer.requires_grad_(True)
    sums = [{name: torch.zeros(p.shape, dtype=torch.float32, device=accumulate) for name, p in layer.named_parameters()}
            for layer in layers]
    try:
        for ids in calibration_batches(blocks, batch_size, device):
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            for layer, layer_sums in zip(layers, sums):
                for name, parameter in layer.named_parameters():
                    grad = parameter.grad.float().to(accumulate)
                    layer_sums[name] += grad.square() if squared else grad
                    parameter.grad = None
    finally:
        model.requires_grad_(False)
    scores = []
    for layer, layer_sums in zip(layers, sums):
        weights = {name: p.detach().float().to(accumulate) for name, p in layer.named_parameters()}
        scores.append({name: (weights[name].square() * s / 2 if squared else (weights[name] * s).abs())
                       for name, s in layer_sums.items()})
    return scores


@torch.no_grad()
def activation_scores(model: PreTrainedModel, blocks: torch.Tensor, batch_size: int,
                      accumulate: torch.device | None = None) -> list[dict[str, torch.Tensor]]:
    """Per layer and parameter, Wanda's |w| * ||x_column||, the input norm over all calibration tokens."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    accumulate = accumulate or device
    squares: dict[nn.Module, torch.Tensor] = {}

    def record(module: nn.Module, args: tuple) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        squares[module] = squares.get(module, 0) + x.square().sum(0).to(accumulate)

    linears = [m for layer in layers for m in layer.modules() if isinstance(m, nn.Linear)]
    hooks = [m.register_forward_pre_hook(record) for m in linears]
    try:
        for ids in calibration_batches(blocks, batch_size, device):
            model.model(input_ids=ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    scores = []
    for layer in layers:
        layer_scores = {name: torch.zeros(p.shape, dtype=torch.float32, device=accumulate)
                        for name, p in layer.named_parameters()}
        for path, module in layer.named_modules():
            if isinstance(module, nn.Linear) and module in squares:
                layer_scores[f"{path}.weight"] = module.weight.float().to(accumulate).abs() * squares[module].sqrt()
        scores.append(layer_scores)
    return scores


def unit_importance(model: PreTrainedModel, blocks: torch.Tensor, batch_size: int, method: str,
                    accumulate: torch.device | None = None) -> list[Unit]:
    """The unit table of the model's current layers, scored on `blocks` (calibration text)."""
    if method not in IMPORTANCE:
        raise WidthError(f"importance must be one of {', '.join(IMPORTANCE)}, got {method!r}")
    family = check_prunable(model)
    geometry, channels = full_geometry(model)
    if method == "wanda":
        scores = activation_scores(model, blocks, batch_size, accumulate)
    else:
        scores = gradient_scores(model, blocks, batch_size, method == "taylor2", accumulate)
    return unit_table(decoder_layers(model), scores, family, geometry, channels)


def _keep(tensor: torch.Tensor, dim: int, size: int, indices: Sequence[int]) -> torch.Tensor:
    rows = torch.tensor([i * size + j for i in indices for j in range(size)], dtype=torch.long, device=tensor.device)
    return tensor.index_select(dim, rows)


def _install(layer: nn.Module, params: dict[str, torch.Tensor]) -> None:
    """Put the new (smaller) tensors into the layer: linear layers rebuilt at their new shape."""
    for name, tensor in params.items():
        path, _, part = name.rpartition(".")
        module = layer.get_submodule(path)
        if getattr(module, part).shape == tensor.shape:
            continue
        setattr(module, part, nn.Parameter(tensor.clone(), requires_grad=False))
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape


def prune_layer(layer: nn.Module, keep: LayerUnits, family: LayerFamily, geometry: Geometry, channels: int) -> None:
    """Cut one full-width layer down to the units in `keep`, in place."""
    if not keep.kv_heads:
        raise WidthError("a kept layer needs at least one key-value head (a layer with nothing left is removed)")
    if keep.kv_heads[-1] >= geometry.kv_heads or keep.channels and keep.channels[-1] >= channels:
        raise WidthError(f"the plan keeps units beyond the layer's {geometry.kv_heads} key-value heads and "
                         f"{channels} channels")
    roles = family.to_roles(layer_params(layer), geometry)
    for kind, kept, count in (("attention", keep.kv_heads, geometry.kv_heads), ("mlp", keep.channels, channels)):
        for name, dim, size in list(_slices(roles, kind, geometry, count)):
            roles[name] = _keep(roles[name], dim, size, kept)
    if not keep.channels:
        roles = {k: v for k, v in roles.items() if k.split(".")[0] not in ("gate", "up", "down")}
        layer.set_submodule(family.mlp, EmptyMLP())
    _install(layer, family.from_roles(roles))
    _set_heads(layer.get_submodule(family.o.rsplit(".", 1)[0]), len(keep.kv_heads), geometry.group_size)


def _set_heads(attention: nn.Module, kv_heads: int, group_size: int) -> None:
    """Tell the attention module its new head counts, wherever its family reads them (Phi-3 splits
    its fused qkv by the config's counts, so each pruned layer gets a config of its own)."""
    if getattr(attention, "config", None) is not None:
        attention.config = copy.copy(attention.config)
        attention.config.num_attention_heads = kv_heads * group_size
        attention.config.num_key_value_heads = kv_heads
    for name, value in (("num_heads", kv_heads * group_size), ("num_attention_heads", kv_heads * group_size),
                        ("num_key_value_heads", kv_heads)):
        if isinstance(getattr(attention, name, None), int):
            setattr(attention, name, value)


def prune_width(model: PreTrainedModel, units: Sequence[LayerUnits]) -> PreTrainedModel:
    """Cut every decoder layer to its units (one entry per layer), in place: a layer that keeps
    nothing is removed, and uniform widths go into the config."""
    family = check_prunable(model)
    layers = decoder_layers(model)
    if len(units) != len(layers):
        raise WidthError(f"the plan has units for {len(units)} layers, the model has {len(layers)}")
    geometry, channels = full_geometry(model)
    for layer, keep in zip(layers, units):
        if not keep.empty:
            prune_layer(layer, keep, family, geometry, channels)
    if any(keep.empty for keep in units):
        types = dense_layer_types(model)
        kept = [i for i, keep in enumerate(units) if not keep.empty]
        install_layers(model, [layers[i] for i in kept], None if types is None else [types[i] for i in kept])
    widths = uniform_widths([keep for keep in units if not keep.empty])
    if widths is not None:
        heads, width = widths
        config = model.config
        config.head_dim = geometry.head_dim
        config.num_attention_heads = heads * geometry.group_size
        config.num_key_value_heads = heads
        config.intermediate_size = width
    return model


def uniform_widths(units: Sequence[LayerUnits]) -> tuple[int, int] | None:
    """(key-value heads, channels) if every layer has the same, non-zero ones; else None."""
    widths = {(len(u.kv_heads), len(u.channels)) for u in units}
    if len(widths) == 1 and 0 not in next(iter(widths)):
        return widths.pop()
    return None


def save_pruned(model: PreTrainedModel, units: Sequence[LayerUnits] | None, folder: Path) -> str:
    """Save a compact model into `folder` and say what loads it.

    Depth-only or uniform widths: a plain Hugging Face folder (the config says the widths),
    "transformers". Otherwise the weights as safetensors with the per-layer widths beside the
    base config, "gaprune" (`load_width_pruned`).
    """
    if units is None or uniform_widths(units) is not None:
        model.save_pretrained(folder)
        return "transformers"
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"))
    widths = [{"kv_heads": len(u.kv_heads), "channels": len(u.channels)} for u in units]
    (folder / WIDTHS_FILE).write_text(json.dumps({"format": "gaprune.widths", "layers": widths}, indent=1) + "\n")
    return "gaprune"


def load_width_pruned(folder: str | Path, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Rebuild a model saved by `save_pruned`: from its config at full width, cut to the saved
    widths, then filled with the saved weights (safetensors: no pickle, no remote code)."""
    from safetensors.torch import load_model

    folder = Path(folder)
    if not (folder / WIDTHS_FILE).is_file():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    widths = json.loads((folder / WIDTHS_FILE).read_text())["layers"]
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    prune_width(model, [LayerUnits(tuple(range(w["kv_heads"])), tuple(range(w["channels"]))) for w in widths])
    load_model(model, str(folder / "model.safetensors"), strict=True)
    model.tie_weights()
    return model.eval()

