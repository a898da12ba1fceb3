"""Merging a layer into its anchor after aligning it by function-preserving transformations.

Two layers of one network compute in different bases: their MLP units come in arbitrary order,
their key-value heads too, and each head's value/output space is only defined up to a rotation.
Averaging raw weights mixes unrelated units. So before fusing layer j into anchor a we

1. fold each RMSNorm weight into the projections that read it (exact),
2. permute j's MLP intermediate units to best match a's (an assignment on the correlation of
   their activations on calibration text),
3. permute j's key-value head groups, carrying their query heads along, to best match a's
   (assignment on the Procrustes fit of the heads' outputs),
4. rotate each value/output head space of j by the orthogonal Procrustes solution onto a's.
Steps 2 to 4 are `evaluators.alignment`: statistics streamed on the device, never raw
activations kept, and alignments kept on disk for other actors and resumed runs.

Every step leaves layer j's own function unchanged, and the merger proves it for each layer
before fusing it: the aligned layer must add to a few calibration tokens' hidden states what
the original adds (fp32, relative error below ALIGNMENT_TOLERANCE). A family whose layout
these steps misread is refused with a MergeError instead of scored wrong. Where families differ
(norms scaling by 1 + w, norms around each sub-layer, fused projections, q/k norms over all
heads) the layer's LayerFamily translates its parameters into roles and back; a mixture of
experts has no single MLP to permute and is refused. Then the aligned
weights are combined with the anchor's by a rule: "mean" (interpolation) or "sum" (anchor plus
the sum of the aligned differences, as LaCo does), one layer at a time in fp32, so a block of
k layers needs two layers' fp32 copies, not k + 1. Fused layers are cached within a byte budget.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
from torch import nn

from chromosomes import Block
from evaluators.alignment import Alignment, AlignmentCache, Moments, compute_alignment
from evaluators.config import MERGE_RULES
from evaluators.families import Geometry, LayerFamily, LayoutError, Params

MergeRule = Literal["mean", "sum"]
# An aligned layer may change what it adds to its input by at most this much (relative, fp32):
# permutations and rotations are exact up to rounding (tests/test_merge.py checks every supported family).
ALIGNMENT_TOLERANCE = 1e-4
PROBE_TOKENS = 32  # calibration tokens a layout check runs on (each aligned layer, each repaired family)


class MergeError(ValueError):
    """Merging would produce a layer that is not what the alignment promises."""


@dataclass(frozen=True)
class LayerInput:
    """One recorded call of a dense decoder layer (hidden states and the model's keyword
    arguments: position embeddings, masks), to re-run a layer in isolation."""

    args: tuple
    kwargs: dict[str, Any]

    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def fp32(self) -> "LayerInput":
        def cast(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return value.float()
            if isinstance(value, tuple):
                return tuple(cast(v) for v in value)
            return value
        return LayerInput(cast(self.args), {key: cast(value) for key, value in self.kwargs.items()})


def require_mergeable(layer: nn.Module, model_name: str, family: LayerFamily, geometry: Geometry) -> None:
    """Refuse, before any work, a layer without the norms and projections merging rewrites."""
    try:
        folded_params(layer, family, geometry)
        family.module(layer, family.down), family.module(layer, family.o)
    except LayoutError as missing:
        raise layout_error(model_name, missing) from None


def layout_error(model_name: str, missing: LayoutError) -> MergeError:
    return MergeError(f"merging is not supported for {model_name}: {missing}; pass --no-merge to search skip/keep only")


@torch.no_grad()
def record_layer_inputs(model: nn.Module, layers: Sequence[nn.Module], ids: torch.Tensor) -> list[LayerInput]:
    """Every dense layer's call on `ids` [1, tokens]: the probes that check an aligned layer."""
    recorded: list[LayerInput | None] = [None] * len(layers)

    def recorder(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            recorded[index] = LayerInput(args, dict(kwargs))
        return hook

    handles = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model.model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [probe for probe in recorded if probe is not None]


def function_change(original: nn.Module, params: Params, probe: LayerInput, family: LayerFamily) -> float:
    """How much a layer rebuilt from `params` (roles) changes what `original` adds to its input
    (relative norm of the difference, in fp32)."""
    reference = copy.deepcopy(original).float()
    rebuilt = build_layer(reference, params, family)
    probe = probe.fp32()

    def added(layer: nn.Module) -> torch.Tensor:
        out = layer(*probe.args, **probe.kwargs)
        return (out[0] if isinstance(out, tuple) else out) - probe.hidden()

    with torch.no_grad():
        expected = added(reference)
        return float((added(rebuilt) - expected).norm() / expected.norm().clamp_min(1e-12))


def folded_params(layer: nn.Module, family: LayerFamily, geometry: Geometry) -> Params:
    """The layer's parameters as roles, in fp32, with each input norm's scale folded into the
    projections that read it (the norm then scales by exactly 1)."""
    params = family.to_roles({name: p.detach().float().clone() for name, p in layer.named_parameters()}, geometry)
    for norm, readers in (("attention_norm", ("q", "k", "v")), ("mlp_norm", ("gate", "up"))):
        if getattr(family, norm) is None:
            continue
        weight = params[f"{norm}.weight"]
        for role in readers:
            params[f"{role}.weight"] = params[f"{role}.weight"] * (weight + family.norm_offset)
        params[f"{norm}.weight"] = torch.full_like(weight, 1.0 - family.norm_offset)
    return params


def apply_alignment(params: Params, alignment: Alignment, geometry: Geometry) -> Params:
    """Permute and rotate a layer's (folded) role parameters; its function stays the same.

    q/k norms over single heads are shared by every head and need nothing; norms over all heads
    at once (OLMo 2) follow their rows.
    """
    out = dict(params)
    d, r = geometry.head_dim, geometry.group_size
    rotations = alignment.rotations.to(out["v.weight"].device)
    kv_rows = (alignment.group_order[:, None] * d + torch.arange(d)).reshape(-1)
    query_heads = (alignment.group_order[:, None] * r + torch.arange(r)).reshape(-1)
    q_rows = (query_heads[:, None] * d + torch.arange(d)).reshape(-1)
    for rows, names in ((q_rows, ("q.weight", "q.bias", "q_norm.weight")),
                        (kv_rows, ("k.weight", "k.bias", "v.weight", "v.bias", "k_norm.weight"))):
        for name in names:
            if name in out and out[name].shape[0] == rows.numel():
                out[name] = out[name][rows]
    out["o.weight"] = out["o.weight"][:, q_rows]
    # Value rotation: v -> R^T v per group, and every query head of the group reads o -> W_o R.
    value = out["v.weight"].view(geometry.kv_heads, d, -1)
    out["v.weight"] = torch.einsum("gji,gjk->gik", rotations, value).reshape(-1, value.shape[-1])
    if "v.bias" in out:
        bias = out["v.bias"].view(geometry.kv_heads, d)
        out["v.bias"] = torch.einsum("gji,gj->gi", rotations, bias).reshape(-1)
    output = out["o.weight"].view(-1, geometry.kv_heads, r, d)
    out["o.weight"] = torch.einsum("ogrj,gjk->ogrk", output, rotations).reshape(output.shape[0], -1)
    order = alignment.mlp_order
    for name in ("gate.weight", "gate.bias", "up.weight", "up.bias"):
        if name in out:
            out[name] = out[name][order]
    out["down.weight"] = out["down.weight"][:, order]
    return out


def combine(anchor: Params, others: Iterable[Params], rule: MergeRule) -> Params:
    """Fuse aligned parameters, taking one layer at a time (each can be freed once added): the
    mean of all, or the anchor plus every difference to it."""
    if rule not in MERGE_RULES:
        raise ValueError(f"unknown merge rule {rule!r}; choose one of {', '.join(MERGE_RULES)}")
    total, count = dict(anchor), 1
    for other in others:
        for name, value in other.items():
            total[name] = total[name] + (value if rule == "mean" else value - anchor[name])
        count += 1
    return {name: value / count for name, value in total.items()} if rule == "mean" else total


def build_layer(template: nn.Module, params: Params, family: LayerFamily) -> nn.Module:
    """A new layer of the template's class and dtype holding the given role parameters."""
    params = family.from_roles(params)
    layer = copy.deepcopy(template)
    with torch.no_grad():
        for name, parameter in layer.named_parameters():
            parameter.copy_(params[name].to(parameter.dtype))
    return layer


class LayerMerger:
    """Fuses merge blocks of a dense model, caching alignments and fused layers for reuse.

    `statistics(anchor, other)` streams what aligning a pair needs from the dense model (None:
    merge without alignment, for ablations). A GA revisits the same merge blocks many times, so
    alignments are kept (in memory, and on disk with `store`) and fused layers are kept in an LRU
    cache of at most `cache_bytes`.
    """

    def __init__(
        self, layers: Sequence[nn.Module], statistics: Callable[[int, int], tuple[Moments, torch.Tensor]] | None,
        geometry: Geometry, family: LayerFamily, rule: MergeRule = "mean", cache_bytes: int = 4 * 1024**3,
        probes: Sequence[LayerInput] | None = None, model_name: str = "this model", assignment: str = "auto",
        store: AlignmentCache | None = None,
    ):
        if rule not in MERGE_RULES:
            raise ValueError(f"unknown merge rule {rule!r}; choose one of {', '.join(MERGE_RULES)}")
        self.layers = list(layers)
        self.statistics = statistics
        self.geometry = geometry
        self.family = family
        self.rule = rule
        self.cache_bytes = cache_bytes
        self.probes = probes  # None: no check (tests of the arithmetic itself)
        self.model_name = model_name
        self.assignment = assignment
        self.store = store
        self._alignments: dict[tuple[int, int], Alignment] = {}
        self._fused: OrderedDict[Block, nn.Module] = OrderedDict()
        self._fused_bytes = 0
        self.changes: dict[tuple[int, int], float] = {}  # (anchor, other) -> checked function change

    def alignment(self, anchor: int, other: int) -> Alignment:
        if self.statistics is None:
            intermediate = self.family.module(self.layers[other], self.family.down).in_features
            return Alignment.identity(intermediate, self.geometry)
        key = (anchor, other)
        if key not in self._alignments:
            found = self.store.get(anchor, other) if self.store else None
            if found is None:
                found = compute_alignment(*self.statistics(anchor, other), self.assignment)
                if self.store:
                    self.store.put(anchor, other, found)
            self._alignments[key] = found
        return self._alignments[key]

    def __call__(self, block: Block) -> nn.Module:
        if block in self._fused:
            self._fused.move_to_end(block)
            return self._fused[block]
        try:
            anchor = folded_params(self.layers[block.anchor], self.family, self.geometry)
            aligned = (self.aligned(block.anchor, j) for j in block.merged)  # one at a time
            fused = build_layer(self.layers[block.anchor], combine(anchor, aligned, self.rule), self.family)
        except LayoutError as missing:
            raise layout_error(self.model_name, missing) from None
        fused.requires_grad_(False)
        self._fused[block] = fused
        self._fused_bytes += _bytes(fused)
        while self._fused_bytes > self.cache_bytes and len(self._fused) > 1:
            _, dropped = self._fused.popitem(last=False)
            self._fused_bytes -= _bytes(dropped)
        return fused

    def aligned(self, anchor: int, other: int) -> Params:
        """Layer `other` in the anchor's basis, refused unless it still computes what it did."""
        params = apply_alignment(folded_params(self.layers[other], self.family, self.geometry),
                                 self.alignment(anchor, other), self.geometry)
        if self.probes is not None and (anchor, other) not in self.changes:
            change = function_change(self.layers[other], params, self.probes[other], self.family)
            if not change < ALIGNMENT_TOLERANCE:
                raise MergeError(
                    f"merging is not supported for {self.model_name}: aligning layer {other} to layer {anchor} "
                    f"changed layer {other}'s own function by {change:.2e} (relative; at most "
                    f"{ALIGNMENT_TOLERANCE:.0e} allowed), so its norms or projections are laid out otherwise than "
                    "the merge assumes; pass --no-merge to search skip/keep only")
            self.changes[anchor, other] = change
        return params


def _bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
