"""Units of a decoder layer: what they cost, how important they are, and a layer cut down to some.

An attention unit is one key-value head with the `group_size` query heads that read it (their
rows of q_proj, the head's rows of k_proj and v_proj, the query heads' columns of o_proj, their
biases and all-head q/k norm entries), so every layer keeps its query:key-value ratio exactly.
An MLP unit is one intermediate channel (a row of gate_proj and up_proj, a column of down_proj).
The layer family's roles say where those live, so fused q/k/v or gate/up matrices are cut the
same way.

Importance of a unit is the sum over its weights of a per-weight score, from calibration text:
- taylor:  |w * dL/dw|, the gradient summed over windows (first-order Taylor);
- taylor2: w^2 * F / 2 with F the diagonal Fisher, the squared gradient summed over windows;
- wanda:   |w| * ||x||, x the input of w's column over all tokens (no gradients).
Gradients are taken one window at a time, so the pass needs one window's activations.

A layer that keeps no key-value head has its attention (and the norms around it) replaced by
`NoAttention`, one that keeps no channel its MLP by `EmptyMLP`: they add nothing to the residual
stream and hold no weights, so a saved model has none for them.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from chromosomes import Shape
from chromosomes.width import LayerUnits, Unit
from evaluators.config import IMPORTANCE
from evaluators.families import Geometry, LayerFamily, family_of
from evaluators.models import decoder_layers



class WidthError(ValueError):
    """The model or the plan cannot be cut this way; the message says why."""


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


class NoAttention(nn.Module):
    """The attention of a layer that kept no key-value head: it adds nothing to the residual stream.

    A KV cache takes the number of tokens seen from its first layer, so a layer without attention
    still tells its cache entry that the tokens went by: one head of width one, zeros, a few bytes
    a token (an entry of width zero would count as empty).
    """

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            marker = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(marker, marker, self.layer_idx)
        return torch.zeros_like(hidden_states), None


def check_prunable(model: PreTrainedModel) -> LayerFamily:
    family = family_of(model)
    if family.experts:
        raise WidthError(f"width pruning is not supported for {type(model).__name__}: its MLP is a mixture of experts; "
                         "search --space layers")
    return family


def full_geometry(model: PreTrainedModel) -> tuple[Geometry, int]:
    """Head layout and MLP width of an unpruned layer of this model."""
    return Geometry.of(model.config), model.config.intermediate_size


def span_size(span: str, geometry: Geometry) -> int:
    return {"query": geometry.group_size * geometry.head_dim, "kv": geometry.head_dim, "channel": 1}[span]


def _slices(roles: dict[str, torch.Tensor], kind: str, geometry: Geometry, units: int) -> Iterator[tuple[str, int, int]]:
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


def sublayer_paths(family: LayerFamily) -> dict[str, tuple[str, ...]]:
    """Per kind, the module paths that go with the sub-layer: the module itself, then its norms."""
    attention = family.o.rsplit(".", 1)[0]
    return {"attention": (attention, *(n for n in (family.attention_norm, family.attention_output_norm) if n)),
            "mlp": (family.mlp, *(n for n in (family.mlp_norm, family.mlp_output_norm) if n))}


def layer_shape(model: PreTrainedModel) -> Shape:
    """The model's decoder layer as the genome prices it (every layer must have the same parts)."""
    family = check_prunable(model)
    geometry, channels = full_geometry(model)
    layers = decoder_layers(model)
    shapes = {_shape_of(layer, family, geometry, channels, len(layers)) for layer in layers}
    if len(shapes) != 1:
        raise WidthError(f"the decoder layers of {type(model).__name__} differ in size; search --space layers")
    return shapes.pop()


def _shape_of(layer: nn.Module, family: LayerFamily, geometry: Geometry, channels: int, num_layers: int) -> Shape:
    weights = family.to_roles(layer_params(layer), geometry)
    unit_cost = {kind: sum(weights[name].numel() // count for name, _, _ in _slices(weights, kind, geometry, count))
                 for kind, count in (("attention", geometry.kv_heads), ("mlp", channels))}
    part = {kind: sum(p.numel() for path in paths for p in family.module(layer, path).parameters())
            for kind, paths in sublayer_paths(family).items()}
    total = sum(p.numel() for p in layer.parameters())
    return Shape(num_layers, geometry.kv_heads, channels,
                 part["attention"] - geometry.kv_heads * unit_cost["attention"], unit_cost["attention"],
                 part["mlp"] - channels * unit_cost["mlp"], unit_cost["mlp"], total - part["attention"] - part["mlp"])


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
                importance += roles[name].double().movedim(dim, 0).reshape(count, -1).sum(1).cpu()
                cost += weights[name].numel() // count
            table += [Unit(position, kind, index, float(importance[index]), cost) for index in range(count)]
    return table


def gradient_scores(model: PreTrainedModel, blocks: torch.Tensor, squared: bool) -> list[dict[str, torch.Tensor]]:
    """Per layer and parameter, |w * sum of gradients| (taylor) or w^2 * sum of squared gradients / 2 (taylor2)."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    model.requires_grad_(False)
    for layer in layers:
        layer.requires_grad_(True)
    sums = [{name: torch.zeros(p.shape, dtype=torch.float32, device=device) for name, p in layer.named_parameters()}
            for layer in layers]
    try:
        for window in blocks:
            ids = window[None].to(device)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            for layer, layer_sums in zip(layers, sums):
                for name, parameter in layer.named_parameters():
                    grad = parameter.grad.float()
                    layer_sums[name] += grad.square() if squared else grad
                    parameter.grad = None
    finally:
        model.requires_grad_(False)
    scores = []
    for layer, layer_sums in zip(layers, sums):
        weights = {name: p.detach().float() for name, p in layer.named_parameters()}
        scores.append({name: (weights[name].square() * s / 2 if squared else (weights[name] * s).abs())
                       for name, s in layer_sums.items()})
    return scores


@torch.no_grad()
def activation_scores(model: PreTrainedModel, blocks: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Per layer and parameter, Wanda's |w| * ||x_column||, the input norm over all calibration tokens."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    squares: dict[nn.Module, torch.Tensor] = {}

    def record(module: nn.Module, args: tuple) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        squares[module] = squares.get(module, 0) + x.square().sum(0)

    linears = [m for layer in layers for m in layer.modules() if isinstance(m, nn.Linear)]
    hooks = [m.register_forward_pre_hook(record) for m in linears]
    try:
        for window in blocks:
            model.model(input_ids=window[None].to(device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    scores = []
    for layer in layers:
        layer_scores = {name: torch.zeros(p.shape, dtype=torch.float32, device=device)
                        for name, p in layer.named_parameters()}
        for path, module in layer.named_modules():
            if isinstance(module, nn.Linear) and module in squares:
                layer_scores[f"{path}.weight"] = module.weight.float().abs() * squares[module].sqrt()
        scores.append(layer_scores)
    return scores


def unit_importance(model: PreTrainedModel, blocks: torch.Tensor, method: str) -> list[Unit]:
    """The unit table of the model's decoder layers, scored on `blocks` (calibration text)."""
    if method not in IMPORTANCE:
        raise WidthError(f"ranking must be one of {', '.join(IMPORTANCE)}, got {method!r}")
    family = check_prunable(model)
    geometry, channels = full_geometry(model)
    if method == "wanda":
        scores = activation_scores(model, blocks)
    else:
        scores = gradient_scores(model, blocks, method == "taylor2")
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


def narrowed(layer: nn.Module, keep: LayerUnits, family: LayerFamily, geometry: Geometry, channels: int) -> nn.Module:
    """The layer cut down to the units in `keep`. A sub-layer that keeps every unit is the dense
    layer's own module (nothing copied); a cut one is a new module; one that keeps none is gone
    with its norms (NoAttention, EmptyMLP)."""
    if keep.kv_heads and keep.kv_heads[-1] >= geometry.kv_heads or keep.channels and keep.channels[-1] >= channels:
        raise WidthError(f"the plan keeps units beyond the layer's {geometry.kv_heads} key-value heads and "
                         f"{channels} channels")
    paths = sublayer_paths(family)
    wanted = (("attention", keep.kv_heads, geometry.kv_heads), ("mlp", keep.channels, channels))
    cuts = [(kind, kept, count) for kind, kept, count in wanted if kept and len(kept) < count]
    if cuts:  # both cuts read the roles of the whole layer (a fused matrix splits by the full layout)
        for kind, _, _ in cuts:
            layer = family.replaced(layer, paths[kind][0], copy.deepcopy(family.module(layer, paths[kind][0])))
        roles = family.to_roles(layer_params(layer), geometry)
        cut = {name: _keep(roles[name], dim, size, kept) for kind, kept, count in cuts
               for name, dim, size in _slices(roles, kind, geometry, count)}
        _install(layer, family.from_roles({**roles, **cut}))
        if any(kind == "attention" for kind, _, _ in cuts):
            _set_heads(family.module(layer, paths["attention"][0]), len(keep.kv_heads), geometry.group_size)
    for kind, kept, _ in wanted:
        if not kept:
            layer = without(layer, kind, family)
    return layer


def without(layer: nn.Module, kind: str, family: LayerFamily) -> nn.Module:
    """A copy of the layer whose sub-layer of this kind adds nothing and holds no weights."""
    module, *norms = sublayer_paths(family)[kind]
    empty = NoAttention(family.module(layer, module).layer_idx) if kind == "attention" else EmptyMLP()
    layer = family.replaced(layer, module, empty)
    for norm in norms:
        layer = family.replaced(layer, norm, nn.Identity())
    return layer


def _set_heads(attention: nn.Module, kv_heads: int, group_size: int) -> None:
    """Tell the attention module its new head counts, wherever its family reads them (Phi-3 splits
    its fused qkv by the config's counts, so each cut attention gets a config of its own)."""
    if getattr(attention, "config", None) is not None:
        attention.config = copy.copy(attention.config)
        attention.config.num_attention_heads = kv_heads * group_size
        attention.config.num_key_value_heads = kv_heads
    for name, value in (("num_heads", kv_heads * group_size), ("num_attention_heads", kv_heads * group_size),
                        ("num_key_value_heads", kv_heads)):
        if isinstance(getattr(attention, name, None), int):
            setattr(attention, name, value)


def output_columns(kind: str, keep: LayerUnits, geometry: Geometry) -> list[int]:
    """The columns of the sub-layer's output projection (o_proj, down_proj) that the kept units feed."""
    if kind == "mlp":
        return list(keep.channels)
    size = span_size("query", geometry)
    return [head * size + j for head in keep.kv_heads for j in range(size)]
