"""Layer families: the one place that knows how each model family lays out a decoder layer.

Merging, seam repair, calibration and healing all work on *roles* (the norm that feeds the
attention, the query projection, the MLP's output projection...), never on parameter names.
A `LayerFamily` says where each role lives in a layer of its family: which norms there are and
how they scale (`x * w`, or Gemma's `x * (1 + w)`), which norms sit on a sub-layer's output,
whether q/k/v and gate/up are fused into one matrix, whether q/k have norms of their own, and
whether the MLP is a mixture of experts. `FAMILIES` registers the families we test, keyed by
`config.model_type`; any other model is read from its module tree by `discover`, and merging
still proves each aligned layer on real tokens before it is used.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

Params = dict[str, torch.Tensor]


class LayoutError(ValueError):
    """A layer lacks a part its family entry names: the message says which."""


@dataclass(frozen=True)
class Geometry:
    """Head layout of one attention block (query heads h use key-value head h // group_size)."""

    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads

    @classmethod
    def of(cls, config) -> "Geometry":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(heads, getattr(config, "num_key_value_heads", None) or heads, head_dim)


# Role names of the canonical (Llama-shaped) parameter dictionary that merging works on.
ROLES = ("attention_norm", "mlp_norm", "q_norm", "k_norm", "q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class LayerFamily:
    """Where each role of a decoder layer lives, as module paths relative to the layer."""

    name: str
    attention_norm: str | None = "input_layernorm"  # read by q, k, v (None: the family has none)
    mlp_norm: str | None = "post_attention_layernorm"  # read by gate, up
    norm_offset: float = 0.0  # norms scale by (offset + w): 1.0 for Gemma
    attention_output_norm: str | None = None  # a norm on the attention's output, before the residual add
    mlp_output_norm: str | None = None  # the same after the MLP (Gemma, OLMo 2)
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    qkv: str | None = None  # one matrix holding q, k, v rows in that order (Phi-3)
    gate_up: str | None = None  # one matrix holding gate then up rows (Phi-3)
    q_norm: str | None = None  # q/k norms of their own (Qwen3, Gemma 3: per head; OLMo 2: over all heads)
    k_norm: str | None = None
    experts: bool = False  # the MLP is a mixture of experts: no single MLP to permute or repair
    output_scale: str | None = None  # config attribute scaling each sub-layer's output before the residual add

    @property
    def layer_norms(self) -> tuple[str, ...]:
        """Every norm that is a direct part of the layer (what calibration and healing train)."""
        return tuple(n for n in (self.attention_norm, self.mlp_norm, self.attention_output_norm, self.mlp_output_norm) if n)

    @property
    def head_norms(self) -> tuple[str, ...]:
        return tuple(n for n in (self.q_norm, self.k_norm) if n)

    @property
    def mlp(self) -> str:
        """Path of the MLP module: the parent of its output projection."""
        return self.down.rsplit(".", 1)[0]

    def module(self, layer: nn.Module, path: str) -> nn.Module:
        try:
            return layer.get_submodule(path)
        except AttributeError:
            raise LayoutError(f"{type(layer).__name__} has no {path!r}") from None

    @staticmethod
    def replaced(layer: nn.Module, path: str, new: nn.Module) -> nn.Module:
        """A shallow copy of the layer with the submodule at `path` replaced: the modules on the
        way down are copied, every other submodule (and parameter) is the layer's own."""
        head, _, rest = path.partition(".")
        copied = copy.copy(layer)
        copied._modules = OrderedDict(layer._modules)
        copied._modules[head] = LayerFamily.replaced(layer._modules[head], rest, new) if rest else new
        return copied

    def lora_targets(self, roles: Sequence[str]) -> tuple[str, ...]:
        """Short module names (as peft matches them) that hold the given projection roles."""
        names = [self._holder(role).rsplit(".", 1)[-1] for role in roles]
        return tuple(dict.fromkeys(names))

    def _holder(self, role: str) -> str:
        if role in ("q", "k", "v") and self.qkv:
            return self.qkv
        if role in ("gate", "up") and self.gate_up:
            return self.gate_up
        return getattr(self, role)

    def to_roles(self, params: Params, geometry: Geometry) -> Params:
        """A layer's parameters (name -> tensor) as roles ('q.weight', 'attention_norm.weight',
        ...); fused matrices are split, parameters of no role keep their own names."""
        if self.experts:
            raise LayoutError(f"{self.name} layers hold a mixture of experts, not one MLP")
        out = dict(params)
        d = geometry.head_dim
        if self.qkv:
            self._split(out, self.qkv, {"q": geometry.heads * d, "k": geometry.kv_heads * d, "v": geometry.kv_heads * d})
        if self.gate_up:
            rows = self._require(out, f"{self.gate_up}.weight").shape[0] // 2  # gate rows, then as many up rows
            self._split(out, self.gate_up, {"gate": rows, "up": rows})
        for role in ROLES:
            path = getattr(self, role)
            if path is None or (role in ("q", "k", "v") and self.qkv) or (role in ("gate", "up") and self.gate_up):
                continue
            for kind in ("weight", "bias"):
                name = f"{path}.{kind}"
                if name in out:
                    out[f"{role}.{kind}"] = out.pop(name)
                elif kind == "weight":
                    self._require(out, name)
        return out

    def from_roles(self, roles: Params) -> Params:
        """The inverse of to_roles: parameter names of the family's own layer, fused matrices joined."""
        out = dict(roles)
        if self.qkv:
            self._join(out, self.qkv, ("q", "k", "v"))
        if self.gate_up:
            self._join(out, self.gate_up, ("gate", "up"))
        for role in ROLES:
            path = getattr(self, role)
            for kind in ("weight", "bias"):
                if f"{role}.{kind}" in out and path is not None:
                    out[f"{path}.{kind}"] = out.pop(f"{role}.{kind}")
        return out

    def _require(self, params: Params, name: str) -> torch.Tensor:
        if name not in params:
            raise LayoutError(f"{self.name} layers have no {name!r}")
        return params[name]

    def _split(self, params: Params, path: str, rows: dict[str, int]) -> None:
        for kind in ("weight", "bias"):
            name = f"{path}.{kind}"
            if kind == "bias" and name not in params:
                continue
            parts = self._require(params, name).split(list(rows.values()))
            del params[name]
            for role, part in zip(rows, parts):
                params[f"{role}.{kind}"] = part

    @staticmethod
    def _join(params: Params, path: str, roles: Sequence[str]) -> None:
        for kind in ("weight", "bias"):
            if f"{roles[0]}.{kind}" in params:
                params[f"{path}.{kind}"] = torch.cat([params.pop(f"{role}.{kind}") for role in roles])


SANDWICH = dict(attention_output_norm="post_attention_layernorm", mlp_output_norm="post_feedforward_layernorm")
GEMMA = dict(mlp_norm="pre_feedforward_layernorm", norm_offset=1.0, **SANDWICH)
QK_NORMS = dict(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")
FAMILIES: dict[str, LayerFamily] = {
    "llama": LayerFamily("llama"),
    "mistral": LayerFamily("mistral"),
    "qwen2": LayerFamily("qwen2"),
    "qwen3": LayerFamily("qwen3", **QK_NORMS),
    "granite": LayerFamily("granite", output_scale="residual_multiplier"),
    "gemma2": LayerFamily("gemma2", **GEMMA),
    "gemma3_text": LayerFamily("gemma3_text", **GEMMA, **QK_NORMS),
    "phi3": LayerFamily("phi3", qkv="self_attn.qkv_proj", gate_up="mlp.gate_up_proj"),
    "olmo2": LayerFamily("olmo2", attention_norm=None, mlp_norm=None, **SANDWICH, **QK_NORMS),
    "mixtral": LayerFamily("mixtral", experts=True),
    "qwen3_moe": LayerFamily("qwen3_moe", **QK_NORMS, experts=True),
}


def family_of(model: nn.Module) -> LayerFamily:
    """The registered family of the model's type, or one read from its first decoder layer."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    return discover(model.model.layers[0], model_type or type(model).__name__)


def discover(layer: nn.Module, name: str) -> LayerFamily:
    """A family read from a layer's module tree, for model types not in FAMILIES.

    The norms a layer owns tell where they sit: a `pre_feedforward_layernorm` means the
    post-attention norm is on the attention's output (Gemma); a layer without an input norm
    normalises outputs only (OLMo 2). A norm whose zero weight still passes its input scales
    by 1 + w. An MLP without its own projections but with experts or a router is a mixture. A
    layer that keeps a `residual_multiplier` scales its sub-layers' outputs by it (Granite).
    """
    children = dict(layer.named_children())
    norms = [n for n, child in children.items() if _is_norm(child)]
    mlp = children.get("mlp")
    mlp_parts = dict(mlp.named_children()) if mlp is not None else {}
    attention = dict(children["self_attn"].named_children()) if "self_attn" in children else {}
    sandwich = "pre_feedforward_layernorm" in norms or "input_layernorm" not in norms
    if "pre_feedforward_layernorm" in norms:
        attention_norm, mlp_norm = "input_layernorm", "pre_feedforward_layernorm"
    elif "input_layernorm" not in norms:
        attention_norm, mlp_norm = None, None
    else:
        attention_norm, mlp_norm = "input_layernorm", "post_attention_layernorm"
    return LayerFamily(
        name, attention_norm=attention_norm, mlp_norm=mlp_norm,
        norm_offset=_norm_offset(children[norms[0]]) if norms else 0.0,
        attention_output_norm="post_attention_layernorm" if sandwich and "post_attention_layernorm" in norms else None,
        mlp_output_norm="post_feedforward_layernorm" if "post_feedforward_layernorm" in norms else None,
        qkv="self_attn.qkv_proj" if "qkv_proj" in attention else None,
        gate_up="mlp.gate_up_proj" if "gate_up_proj" in mlp_parts else None,
        q_norm="self_attn.q_norm" if "q_norm" in attention else None,
        k_norm="self_attn.k_norm" if "k_norm" in attention else None,
        experts="experts" in mlp_parts or ("gate" in mlp_parts and "down_proj" not in mlp_parts),
        output_scale="residual_multiplier" if hasattr(layer, "residual_multiplier") else None,
    )


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None


@torch.no_grad()
def _norm_offset(norm: nn.Module) -> float:
    """1.0 if the norm scales by 1 + w (its output survives a zero weight), else 0.0."""
    probe = copy.deepcopy(norm).float()
    probe.weight.zero_()
    out = probe(torch.randn(2, probe.weight.shape[0], generator=torch.Generator().manual_seed(0)))
    return 1.0 if out.abs().max() > 0 else 0.0
