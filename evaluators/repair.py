"""Seam repair: a closed-form, training-free fix of every cut, folded into the weights.

Where a genome removes sub-layers after a kept one, the residual stream after the kept one no
longer looks like the dense model's after the last removed one. The kept sub-layer writes into
that stream through its output projection (down_proj after an MLP, o_proj after an attention
whose MLP is gone), so a linear map T on that output can move it towards the dense one:

    out = h + f(h)        (h: the residual stream the sub-layer reads, f(h): what it writes)
    fit T to minimise || h + f(h) T - dense ||^2 + ridge * ||T - I||^2

and fold it into the weights, W <- T^T W (bias b <- T^T b): same architecture, same parameter
count, a plain Hugging Face model (ReplaceMe and LinearPatch fold such maps too). In a mixture
of experts the MLP's output is the router's weighted sum of its experts' down projections (plus
a shared expert's): linear in each, so the map is fitted on that output and folded into all. Whole layers
removed are runs of two sub-layers each, so a depth genome gets the maps it always got.
The normal equations are accumulated in fp64 over batches, so memory grows with hidden^2 and
never with the number of tokens. Every token counts, the first of each window too: leaving
that attention-sink token out let the map corrupt it, and perplexity rose.

A narrowed sub-layer (fewer key-value groups or channels) is refitted first: its output
projection's kept columns are the least-squares fit of the dense projection's output,

    W_K <- W G[:, K] (G[K, K] + ridge I)^-1,    G = sum over dense tokens of x x^T

with x the projection's input: one Gram matrix per layer and kind serves every width. The same
matrix prices each unit by what this refit loses without it (`removal_order`, `--ranking obs`).

Variants (`--repair`; experiments/repair_variants chose `lsq` on dev text):
- `lsq`: the full map above, folded into the output projection;
- `lsq-attn`: after an MLP, first a map on the attention output, folded into o_proj, then, on the
  layer as it now computes, the map on the MLP output (each stage closed form);
- `scale`: LinearPatch-style, a channel scaling in a rotated basis, T = Q diag(d) Q^T with Q a
  fixed random orthogonal matrix (the rotation spreads outlier channels; a Hadamard matrix
  does the same where the hidden size allows one): hidden values to fit instead of hidden^2.
`--repair-min-run N` repairs only the seams where at least N layers' worth of sub-layers
(2N - 1 of them) were removed.

A seam is fitted on the dense model's input to its block (`dense`: a fit depends on the block
and its target alone, so a search shares it among genomes) or on the cut model's own input,
earlier seams already repaired (`pruned`: a fit depends on the stack's prefix, and genomes
sharing leading layers share it). Fits are cached within a byte budget.
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from evaluators.config import REPAIR_INPUTS, REPAIRS
from evaluators.families import LayerFamily, LayoutError
from evaluators.merge import PROBE_TOKENS
from evaluators.perplexity import Replay
from evaluators.surgery import LayerStack, dense_layer_types, layer_view


# Memory for cached fits (each a new down_proj, and with pruned inputs the repaired block's output
# on the repair tokens): an 8B model's down_proj alone is 117 MB in bf16, so count bytes, not fits.
CACHE_BYTES = 2 * 1024**3
# Where a norm follows a sub-layer (Gemma 2/3, OLMo 2) the map cannot be solved in closed form:
# it is fitted by gradient steps (Adam, the best map seen kept, the identity included) on the
# first DISTIL_BATCHES batches of the repair tokens, so that the layer reproduces the dense state.
DISTIL_STEPS = 32
DISTIL_BATCHES = 2
DISTIL_LR = 1e-3


class RepairError(ValueError):
    """The model's layers cannot be repaired this way; the message says why."""


@dataclass(frozen=True)
class RepairedLayer:
    """Key of a repaired module: the raw block key, and the dense sub-layer whose output it imitates
    (2t: layer t's attention, 2t + 1: layer t's MLP, so the dense state after layer t)."""

    block: Hashable
    target: int


@dataclass(frozen=True)
class Seam:
    """A kept sub-layer followed by removed ones: where a map is fitted and what it imitates."""

    position: int  # of the block in the stack
    kind: str  # the anchor sub-layer: "attention" (its MLP is gone) or "mlp"
    target: int  # the last removed sub-layer (2t: attention of layer t, 2t + 1: its MLP)


def seam_targets(stack: LayerStack, num_layers: int, min_run: int = 1) -> list[Seam]:
    """A seam for every kept sub-layer followed by at least 2 * `min_run` - 1 removed sub-layers.

    Sub-layers are numbered in the order they run (layer t's attention 2t, its MLP 2t + 1); the
    target is the last one removed before the next kept one (or the model's last). Layers merged
    into a block count as removed, since the fused layer is not them.
    """
    kept = []  # (sub-layer index, position in the stack, kind)
    for position, block in enumerate(stack.plan):
        if block.kv_heads != 0:
            kept.append((2 * block.anchor, position, "attention"))
        if block.channels != 0:
            kept.append((2 * block.anchor + 1, position, "mlp"))
    following = [index for index, _, _ in kept[1:]] + [2 * num_layers]
    return [Seam(position, kind, after - 1) for (index, position, kind), after in zip(kept, following)
            if after - index - 1 >= max(1, 2 * min_run - 1)]


def distilled(family: LayerFamily) -> bool:
    """Whether a norm between a sub-layer's projection and the residual stream makes its maps a
    gradient fit (the closed form assumes the projection's output is added as it is)."""
    return bool(family.mlp_output_norm or family.attention_output_norm)


def writer_path(family: LayerFamily, path: str) -> str:
    """The module whose output a map at `path` multiplies: the projection itself, or for a
    mixture of experts the whole MLP (the router's weighted sum of experts, plus any shared
    expert, is linear in each of their down projections' outputs)."""
    return family.mlp if family.experts and path == family.down else path


def output_projection(layer: nn.Module, family: LayerFamily, path: str) -> nn.Linear:
    """The linear map at `path` (down_proj, or o_proj) that writes into the residual stream."""
    return _linear(layer, family, path, "use --repair none" if path == family.down else "use --repair lsq")


def written_weights(layer: nn.Module, family: LayerFamily, path: str) -> list[torch.Tensor]:
    """The weights a map at `path` is folded into (refusing a layer that has none to fold into)."""
    if writer_path(family, path) != path:
        return [weight for _, weight in _expert_writers(family.module(layer, family.mlp))]
    return [output_projection(layer, family, path).weight]


def _expert_writers(mlp: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """A mixture's writers into the residual stream: (child, weight) for the stacked experts' down
    projections (a 3-d [experts, hidden, intermediate] weight, or transposed) and a shared expert's
    down_proj (a linear layer); refused by name when there are no stacked experts."""
    writers = []
    for name, child in mlp.named_children():
        down = getattr(child, "down_proj", None)
        if isinstance(down, nn.Parameter) and down.dim() == 3:
            writers.append((name, down))
        elif isinstance(down, nn.Linear):
            writers.append((name, down.weight))
    if not any(weight.dim() == 3 for _, weight in writers):
        raise RepairError(f"seam repair is not supported for {type(mlp).__name__}: no stacked experts' down_proj "
                          "to fold a map into (use --repair none)")
    return writers


def _linear(layer: nn.Module, family: LayerFamily, path: str, remedy: str) -> nn.Linear:
    try:
        projection = family.module(layer, path)
    except LayoutError:
        projection = None
    if not isinstance(projection, nn.Linear):
        raise RepairError(f"{type(layer).__name__} has no {path} linear layer: seam repair needs one ({remedy})")
    return projection


def with_output_map(layer: nn.Module, transform: torch.Tensor, family: LayerFamily, path: str | None = None) -> nn.Module:
    """A copy of the layer whose projection at `path` (default down_proj) has its output multiplied
    by `transform` [H, H] (W <- T^T W); for a mixture of experts, every expert's and any shared
    expert's down projection, so the MLP's output is multiplied.

    Only the modules on the way to that projection are new objects; every other submodule is the
    dense layer's own, so a repaired view costs one hidden x intermediate matrix (per expert), not
    a whole layer.
    """
    path = path or family.down
    t = transform.to(torch.float64)
    if writer_path(family, path) != path:
        mlp = family.module(layer, family.mlp)
        for name, weight in _expert_writers(mlp):
            child = mlp._modules[name]
            folded = _folded_experts(child, t) if weight.dim() == 3 else \
                family.replaced(child, "down_proj", _folded_linear(child.down_proj, t))
            layer = family.replaced(layer, f"{family.mlp}.{name}", folded)
        return layer
    return family.replaced(layer, path, _folded_linear(output_projection(layer, family, path), t))


def _folded_linear(linear: nn.Linear, t: torch.Tensor) -> nn.Linear:
    """A new linear layer whose output is the old one's times t (fp64 product)."""
    new = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_((t.T @ linear.weight.double()).to(linear.weight.dtype))
        if linear.bias is not None:
            new.bias.copy_((t.T @ linear.bias.double()).to(linear.bias.dtype))
    return new.requires_grad_(False)


def _folded_experts(experts: nn.Module, t: torch.Tensor) -> nn.Module:
    """A shallow copy of a stacked-experts module whose down projections (and their biases) have
    every expert's output multiplied by t; its other weights are the original's own."""
    copied = copy.copy(experts)
    copied._parameters = OrderedDict(experts._parameters)
    down = experts.down_proj
    folded = down.double() @ t if getattr(experts, "is_transposed", False) else t.T @ down.double()
    copied._parameters["down_proj"] = nn.Parameter(folded.to(down.dtype), requires_grad=False)
    bias = getattr(experts, "down_proj_bias", None)
    if isinstance(bias, nn.Parameter):
        copied._parameters["down_proj_bias"] = nn.Parameter((bias.double() @ t).to(bias.dtype), requires_grad=False)
    return copied


def output_scale(model: PreTrainedModel, family: LayerFamily) -> float:
    """The factor a sub-layer's output is multiplied by before the residual add (Granite's
    residual multiplier; 1 elsewhere): a linear factor, so a map fitted on the scaled output
    folds into the projection all the same."""
    return float(getattr(model.config, family.output_scale)) if family.output_scale else 1.0


@torch.no_grad()
def check_mlp_output_is_added(model: PreTrainedModel, layer: nn.Module, ids: torch.Tensor,
                              family: LayerFamily) -> None:
    """Refuse a family whose layer does not add its (scaled) MLP output to the residual stream as it is.

    The fit assumes layer output = (everything else) + scale x MLP output, so that a map on the
    MLP output moves the layer output by exactly as much. A norm after the MLP (Gemma's
    post-feedforward norm) breaks that, and a map folded into down_proj would not do what was
    fitted. Doubling the MLP output must move the layer output by one scaled MLP output: checked
    once, on a few tokens, to within the rounding of the model's dtype (in bf16 the residual sum
    rounds away a few per cent of a small MLP output; a norm after the MLP moves it by ~100 %).
    """
    captured: dict[str, torch.Tensor] = {}

    def run(scale: float) -> torch.Tensor:
        def scale_mlp(_module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
            captured["mlp"] = out
            return out * scale

        hooks = [family.module(layer, family.mlp).register_forward_hook(scale_mlp),
                 layer.register_forward_hook(lambda _m, _a, out: captured.__setitem__("out", out))]
        try:
            model.model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        output = captured["out"]
        return (output[0] if isinstance(output, tuple) else output).float()

    moved = run(2.0) - run(1.0)
    mlp = captured["mlp"].float() * output_scale(model, family)
    error = float((moved - mlp).norm() / mlp.norm().clamp_min(1e-12))
    if not error < max(1e-3, 16 * torch.finfo(next(model.parameters()).dtype).eps):
        raise RepairError(f"seam repair is not supported for {type(model).__name__}: its layers do not add the MLP "
                          f"output to the residual stream as it is (a norm after the MLP?; doubling it moved the "
                          f"layer output {error:.2f} away from one MLP output), so a map folded into down_proj "
                          "would not do what was fitted; use --repair none")


@torch.no_grad()
def check_mixture_folds(model: PreTrainedModel, layer: nn.Module, ids: torch.Tensor, family: LayerFamily) -> None:
    """Refuse a mixture of experts whose output a map folded into its down projections does not
    multiply (another writer, a non-linear mixing): a random map, folded, must give the MLP's
    output times that map on the layer's own input. Checked once, on a few tokens."""
    mlp = family.module(layer, family.mlp)
    inputs: list[torch.Tensor] = []
    hook = mlp.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    try:
        model.model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        hook.remove()
    size = model.config.hidden_size
    transform = torch.eye(size, dtype=torch.float64) + random_rotation(size) / 4
    folded = family.module(with_output_map(layer, transform.to(inputs[0].device), family), family.mlp)
    expected = mlp(inputs[0]).double() @ transform.to(inputs[0].device)
    error = float((folded(inputs[0]).double() - expected).norm() / expected.norm().clamp_min(1e-12))
    if not error < 1e-2:
        raise RepairError(f"seam repair is not supported for {type(mlp).__name__}: a map folded into its experts' "
                          f"down projections does not multiply its output (off by {error:.2f}); use --repair none")


class NormalEquations:
    """Running X^T X and X^T Y in fp64 for the ridge problem min ||X T - Y||^2 + ridge ||T - I||^2
    (a seam's map), or + ridge ||T||^2 when Y has another width (a projection's weights)."""

    def __init__(self, size: int, device: torch.device, outputs: int | None = None):
        self.xx = torch.zeros(size, size, dtype=torch.float64, device=device)
        self.xy = torch.zeros(size, outputs or size, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
        self.xx += x.T @ x
        self.xy += x.T @ y
        self.rows += x.shape[0]

    def solve(self, ridge: float) -> torch.Tensor:
        """T, shrunk towards the identity; ridge is relative to the mean diagonal of X^T X."""
        size = self.xx.shape[0]
        eye = torch.eye(size, dtype=torch.float64, device=self.xx.device)
        return torch.linalg.solve(self.xx + self._strength(ridge) * eye, self.xy + self._strength(ridge) * eye)

    def least_squares(self, ridge: float) -> torch.Tensor:
        """T, shrunk towards zero; ridge is relative to the mean diagonal of X^T X."""
        eye = torch.eye(self.xx.shape[0], dtype=torch.float64, device=self.xx.device)
        return torch.linalg.solve(self.xx + self._strength(ridge) * eye, self.xy)

    def solve_scaling(self, ridge: float, rotation: torch.Tensor) -> torch.Tensor:
        """T = Q diag(d) Q^T: the best channel scaling d in the basis of Q's columns, shrunk towards 1.

        With X~ = X Q and Y~ = Y Q the problem separates by channel, d_j = <x~_j, y~_j> / <x~_j, x~_j>,
        and both inner products are diagonals of the accumulated matrices, so no token is revisited.
        """
        q = rotation.to(self.xx)
        gram = torch.einsum("ij,ik,kj->j", q, self.xx, q)  # diag(Q^T X^T X Q)
        cross = torch.einsum("ij,ik,kj->j", q, self.xy, q)  # diag(Q^T X^T Y Q)
        strength = self._strength(ridge)
        return (q * ((cross + strength) / (gram + strength))) @ q.T

    def _strength(self, ridge: float) -> float:
        return ridge_strength(self.xx, ridge)


def ridge_strength(gram: torch.Tensor, ridge: float) -> float:
    """The ridge relative to the mean diagonal of a Gram matrix X^T X, so it means the same at every scale."""
    return ridge * float(torch.diagonal(gram).mean()) + 1e-12


def removal_order(gram: torch.Tensor, weight: torch.Tensor, ridge: float, unit_size: int = 1,
                  block: int = 1) -> list[int]:
    """The units of a sub-layer from the one its refit misses most to the one it misses least,
    so that every width keeps a prefix (structured Optimal Brain Surgeon, as ZipLM prunes).

    A unit is `unit_size` consecutive input columns of the output projection `weight` (out x in),
    `gram` the Gram matrix of that projection's dense input. Removing the columns S of a
    projection whose kept columns are then refitted (the refit of `SeamRepairer.refit`) costs
    tr(W_S (H^-1_SS)^-1 W_S^T) in squared output, H = gram + ridge. Units go `block` at a time,
    the cheapest first, and W and H^-1 are updated in closed form after each step, so a unit is
    priced by what it adds to a refit that already lost the units before it: the ranking that a
    refit rewards, where one by importance alone prices each unit as if nothing else were cut.
    """
    size = gram.shape[0]
    if size % unit_size or weight.shape[1] != size:
        raise ValueError(f"a Gram matrix of {size} columns and a weight of {weight.shape[1]} do not split into "
                         f"units of {unit_size}")
    eye = torch.eye(size, dtype=torch.float64, device=gram.device)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(gram.double() + ridge_strength(gram, ridge) * eye))
    w = weight.detach().double().to(gram.device).clone()
    alive = list(range(size // unit_size))
    removed: list[int] = []
    while len(alive) > 1:
        count = len(alive)
        h_units = torch.diagonal(hinv.reshape(count, unit_size, count, unit_size), dim1=0, dim2=2).permute(2, 0, 1)
        w_units = w.reshape(-1, count, unit_size).permute(1, 2, 0).contiguous()  # unit, column, output
        lower = torch.linalg.cholesky(h_units.contiguous())  # tr(W_S H_S^-1 W_S^T) = ||L^-1 W_S^T||^2
        cost = torch.linalg.solve_triangular(lower, w_units, upper=False).square().sum((1, 2))
        chosen = torch.sort(cost, stable=True).indices[:min(block, count - 1)].tolist()
        gone = set(chosen)
        columns = torch.tensor([u * unit_size + j for u in chosen for j in range(unit_size)], device=hinv.device)
        h_s = hinv[:, columns]
        inverse = torch.linalg.inv(h_s[columns])
        w -= w[:, columns] @ inverse @ h_s.T
        hinv -= h_s @ inverse @ h_s.T
        keep = torch.tensor([u * unit_size + j for u in range(count) if u not in gone
                             for j in range(unit_size)], device=hinv.device)
        w, hinv = w[:, keep], hinv[keep][:, keep]
        removed += [alive[u] for u in chosen]
        alive = [unit for u, unit in enumerate(alive) if u not in gone]
    return alive + removed[::-1]


def random_rotation(size: int, seed: int = 0) -> torch.Tensor:
    """A fixed random orthogonal matrix (QR of a seeded Gaussian, signs made unique), fp64."""
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


class SeamRepairer:
    """Fits and caches seam repairs of layer stacks, and refits narrowed sub-layers, on fixed
    calibration blocks."""

    def __init__(self, model: PreTrainedModel, dense_layers: Sequence[nn.Module], blocks: torch.Tensor,
                 batch_size: int, family: LayerFamily, ridge: float = 1e-3, inputs: str = "pruned",
                 method: str = "lsq", min_run: int = 1, cache_bytes: int = CACHE_BYTES):
        if ridge < 0:
            raise RepairError(f"ridge must not be negative, got {ridge}")
        if method not in REPAIRS or method == "none":
            raise RepairError(f"repair method must be one of {', '.join(REPAIRS[1:])}, got {method!r}")
        if min_run < 1:
            raise RepairError(f"min_run must be at least 1, got {min_run}")
        if inputs not in REPAIR_INPUTS:
            raise RepairError(f"repair inputs must be one of {', '.join(REPAIR_INPUTS)}, got {inputs!r}")
        # the projections a seam's maps are folded into, in order, by the kind of its anchor
        self.paths = {"attention": (family.o,), "mlp": (family.o, family.down) if method == "lsq-attn" else (family.down,)}
        for layer in dense_layers:
            for path in (family.o, family.down):  # refuse an unsupported layout before any work
                written_weights(layer, family, path)
        self.distil = distilled(family)
        if self.distil and method == "scale":
            raise RepairError(f"repair scale needs the closed form, which a norm after each sub-layer of "
                              f"{type(dense_layers[0]).__name__} rules out: use --repair lsq (fitted by gradient)")
        if not self.distil:
            check_mlp_output_is_added(model, dense_layers[0], blocks[:1, :PROBE_TOKENS], family)
        if family.experts:
            check_mixture_folds(model, dense_layers[0], blocks[:1, :PROBE_TOKENS], family)
        self.scale = output_scale(model, family)
        self.model = model
        self.family = family
        self.dense_layers = list(dense_layers)
        self.dense_types = dense_layer_types(model)
        self.blocks = blocks
        self.batch_size = batch_size
        self.ridge = ridge
        self.inputs = inputs
        self.method = method
        self.min_run = min_run
        self.rotation = random_rotation(model.config.hidden_size) if method == "scale" else None
        self.cache_bytes = cache_bytes
        self._cached_bytes = 0
        self.device = next(model.parameters()).device
        # [depth][batch]: the dense residual stream after `depth` layers (0: the embeddings), and
        # [layer][batch]: after each layer's attention (read only by seams that end inside a layer)
        self._dense: list[list[torch.Tensor]] | None = None
        self._middle: list[list[torch.Tensor]] | None = None
        # what a fit depends on -> (repaired module, its output per batch, bytes held); with pruned
        # inputs that is the stack's key prefix through the repaired block, with dense inputs the block alone
        self._fitted: OrderedDict[Hashable, tuple[nn.Module, list[torch.Tensor], int]] = OrderedDict()
        # (layer, kind) -> Gram matrix of the dense output projection's input, for refits
        self._grams: OrderedDict[tuple[int, str], torch.Tensor] = OrderedDict()
        self._gram_bytes = 0

    def _batches(self) -> list[torch.Tensor]:
        return [self.blocks[s:s + self.batch_size].to(self.device) for s in range(0, self.blocks.shape[0], self.batch_size)]

    @torch.no_grad()
    def dense_states(self) -> list[list[torch.Tensor]]:
        """The dense residual stream before the first layer and after each layer on the repair
        blocks: one dense forward, kept for all fits ((layers + 1) x tokens x hidden values)."""
        if self._dense is None:
            states: list[list[torch.Tensor]] = [[] for _ in range(len(self.dense_layers) + 1)]
            hooks = [layer.register_forward_hook(lambda _m, _a, out, i=i: states[i + 1].append(out))
                     for i, layer in enumerate(self.dense_layers)]
            hooks.append(self.dense_layers[0].register_forward_pre_hook(
                lambda _m, args, kwargs: states[0].append(args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True))
            self._dense_forward(hooks)
            self._dense = states
        return self._dense

    @torch.no_grad()
    def middle_states(self) -> list[list[torch.Tensor]]:
        """The dense residual stream after each layer's attention (what its MLP norm reads): one more
        dense forward, taken only when a seam ends between a layer's attention and its MLP."""
        if self._middle is None:
            states: list[list[torch.Tensor]] = [[] for _ in self.dense_layers]
            reader = self.family.mlp_norm or self.family.mlp  # OLMo 2's MLP reads the stream itself
            hooks = [self.family.module(layer, reader).register_forward_pre_hook(
                     lambda _m, args, i=i: states[i].append(args[0])) for i, layer in enumerate(self.dense_layers)]
            self._dense_forward(hooks)
            self._middle = states
        return self._middle

    def _dense_forward(self, hooks: list) -> None:
        try:
            for ids in self._batches():
                self.model.model(input_ids=ids, use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()

    def dense_after(self, sublayer: int) -> list[torch.Tensor]:
        """The dense residual stream after a sub-layer (2t: layer t's attention, 2t + 1: layer t), per batch."""
        layer, is_mlp = divmod(sublayer, 2)
        return self.dense_states()[layer + 1] if is_mlp else self.middle_states()[layer]

    def repaired(self, stack: LayerStack) -> LayerStack:
        """The stack with every seam repaired (cached fits reused, new ones fitted in order).

        With pruned inputs, each seam is fitted on what the cut model (earlier seams repaired)
        feeds it: exact, at the cost of one forward of the new genome's layers over the repair
        tokens. With dense inputs, a seam is fitted on the dense model's input to its block, so a
        fit depends only on (block, target) and a search soon has every fit it needs cached.
        """
        seams = seam_targets(stack, len(self.dense_layers), self.min_run)
        dense_inputs = self.inputs == "dense"
        modules, keys = list(stack.modules), list(stack.keys)
        state: list[torch.Tensor] | None = None  # output of the last repaired seam, per batch
        done = 0  # blocks of the stack that `state` has passed through
        for seam in seams:
            position = seam.position
            keys[position] = RepairedLayer(stack.keys[position], seam.target)
            key = keys[position] if dense_inputs else tuple(keys[:position + 1])
            if key in self._fitted:
                self._fitted.move_to_end(key)
                modules[position], state, _ = self._fitted[key]
            else:
                if dense_inputs:
                    segment, start, state = [modules[position]], position, self.dense_states()[stack.plan[position].anchor]
                else:
                    segment, start = modules[done:position + 1], done
                types = None if stack.layer_types is None else list(stack.layer_types[start:position + 1])
                modules[position], state = self._fit(segment, types, state, seam)
                self._remember(key, modules[position], [] if dense_inputs else state, seam.kind)
            done = position + 1
        return LayerStack(stack.plan, tuple(keys), tuple(modules), stack.layer_types)

    def _remember(self, key: Hashable, module: nn.Module, state: list[torch.Tensor], kind: str) -> None:
        """Cache a fit, dropping the least recently used ones beyond the cache's byte budget."""
        weights = [w for path in self.paths[kind] for w in written_weights(module, self.family, path)]
        size = sum(t.numel() * t.element_size() for t in [*weights, *state])
        self._fitted[key] = (module, state, size)
        self._cached_bytes += size
        while self._cached_bytes > self.cache_bytes and len(self._fitted) > 1:
            _, (_, _, dropped) = self._fitted.popitem(last=False)
            self._cached_bytes -= dropped

    @torch.no_grad()
    def _fit(self, segment: list[nn.Module], types: list[str] | None, state: list[torch.Tensor] | None,
             seam: Seam) -> tuple[nn.Module, list[torch.Tensor]]:
        """Run `segment` (ending with the block to repair) from `state`, fit its output maps, fold them.

        Each map (o_proj's, then down_proj's for lsq-attn) is fitted on the layer as the maps
        before it left it, so the last fit sees exactly what the repaired layer computes. Returns
        the repaired module and its output on every batch, the next segment's start.
        """
        dense = self.dense_after(seam.target)
        layer, outputs = segment[-1], []
        if self.distil:
            return self._fit_by_gradient(segment, types, state, dense, seam)
        for path in self.paths[seam.kind]:
            equations = NormalEquations(self.model.config.hidden_size, self.device)
            outputs, writes = [], []
            for batch, ids in enumerate(self._batches()):
                captured = self._run(ids, [*segment[:-1], layer], types, None if state is None else state[batch],
                                     {"out": layer, "written": self.family.module(layer, writer_path(self.family, path))})
                out, written = captured["out"], captured["written"] * self.scale  # as the residual stream gets it
                rest = out - written  # what the layer adds besides this projection's output
                equations.add(written, dense[batch] - rest)
                outputs.append(rest)
                writes.append(written)
            transform = self._solve(equations)
            layer = with_output_map(layer, transform, self.family, path)
        t = transform.to(writes[0].dtype)
        return layer, [rest + written @ t for rest, written in zip(outputs, writes)]

    def _fit_by_gradient(self, segment: list[nn.Module], types: list[str] | None, state: list[torch.Tensor] | None,
                         dense: list[torch.Tensor], seam: Seam) -> tuple[nn.Module, list[torch.Tensor]]:
        """`_fit` for a layer whose projections a norm follows: each map, multiplied onto the
        projection's output as folding it would, is fitted by gradient steps to bring the layer's
        output to the dense state; then folded, and the layer run once more for its outputs."""
        layer = segment[-1]
        batches = list(enumerate(self._batches()))[:DISTIL_BATCHES]
        for path in self.paths[seam.kind]:
            size = self.model.config.hidden_size
            transform = torch.eye(size, device=self.device, requires_grad=True)
            optimizer = torch.optim.Adam([transform], lr=DISTIL_LR)
            best = (math.inf, torch.eye(size, device=self.device))
            hook = self.family.module(layer, writer_path(self.family, path)).register_forward_hook(
                lambda _m, _a, out: out @ transform.to(out.dtype))
            try:
                with torch.enable_grad():
                    for step in range(DISTIL_STEPS + 1):  # the last pass only measures
                        total = 0.0
                        for batch, ids in batches:
                            out = self._run(ids, [*segment[:-1], layer], types,
                                            None if state is None else state[batch], {"out": layer})["out"]
                            loss = (out.float() - dense[batch].float()).pow(2).mean() / len(batches)
                            if step < DISTIL_STEPS:
                                loss.backward()
                            total += float(loss.detach())
                        if math.isfinite(total) and total < best[0]:
                            best = (total, transform.detach().clone())
                        if step < DISTIL_STEPS:
                            optimizer.step()
                            optimizer.zero_grad(set_to_none=True)
            finally:
                hook.remove()
            layer = with_output_map(layer, best[1], self.family, path)
        outputs = [self._run(ids, [*segment[:-1], layer], types, None if state is None else state[batch],
                             {"out": layer})["out"] for batch, ids in enumerate(self._batches())]
        return layer, outputs

    def _solve(self, equations: NormalEquations) -> torch.Tensor:
        """The configured map; the identity (the seam left as cut) if activations were not finite."""
        if self.rotation is not None:
            transform = equations.solve_scaling(self.ridge, self.rotation)
        else:
            transform = equations.solve(self.ridge)
        if not torch.isfinite(transform).all():
            transform = torch.eye(transform.shape[0], dtype=transform.dtype, device=transform.device)
        return transform

    def _run(self, ids: torch.Tensor, segment: list[nn.Module], types: list[str] | None,
             state: torch.Tensor | None, watch: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        """Run the segment on one batch (from `state`, else from the embeddings) and return what
        each watched module put out."""
        modules = list(segment)
        types = None if types is None else list(types)
        if state is not None:
            modules.insert(0, Replay(state))
            if types is not None:
                types.insert(0, types[0])  # the replayed layers' attention type does not matter
        captured: dict[str, torch.Tensor] = {}

        def keep(name: str):
            def hook(_module: nn.Module, _args: tuple, out) -> None:
                captured[name] = out[0] if isinstance(out, tuple) else out
            return hook

        hooks = [module.register_forward_hook(keep(name)) for name, module in watch.items()]
        try:
            with layer_view(self.model, modules, types):
                self.model.model(input_ids=ids, use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        return captured

    @torch.no_grad()
    def refit_on_cut(self, stack: LayerStack, whole_layers: bool = False) -> LayerStack:
        """The stack with each narrowed sub-layer's output projection (every kept one's, with
        `whole_layers`) refitted in order on what the cut model so far feeds it, to the dense
        stream where that sub-layer's output goes (past the layers a seam skips): the refit of
        `refit` sees the dense model's inputs and fits the layer's own output, so the errors of
        the layers before it stay. Merged blocks are left as they are. Modules are copied."""
        state = self.dense_states()[0]
        modules = list(stack.modules)
        for position, block in enumerate(stack.plan):
            following = stack.plan[position + 1].anchor if position + 1 < len(stack.plan) else len(self.dense_layers)
            types = None if stack.layer_types is None else [stack.layer_types[position]]
            for kind, kept in (("attention", block.kv_heads), ("mlp", block.channels)):
                if block.merged or kept == 0 or (kept is None and not whole_layers):
                    continue
                mlp_follows = kind == "attention" and block.channels != 0
                target = self.middle_states()[block.anchor] if mlp_follows else self.dense_states()[following]
                if modules[position] is stack.modules[position]:
                    modules[position] = copy.deepcopy(modules[position])
                self._refit_projection(modules[position], kind, state, target, types, mlp_follows)
            state = [self._run(ids, [modules[position]], types, state[batch], {"out": modules[position]})["out"]
                     for batch, ids in enumerate(self._batches())]
        return LayerStack(stack.plan, stack.keys, tuple(modules), stack.layer_types)

    def _refit_projection(self, layer: nn.Module, kind: str, state: list[torch.Tensor], target: list[torch.Tensor],
                          types: list[str] | None, mlp_follows: bool) -> None:
        """Refit, in place, the output projection of this sub-layer of `layer` run from `state`,
        so that the residual stream after it (what the MLP reads, if one follows; else the layer's
        output) is the least-squares fit of `target`."""
        projection = output_projection(layer, self.family, self._output_path(kind))
        size = projection.weight.shape[1]
        equations = NormalEquations(size, self.device, outputs=projection.weight.shape[0])
        seen: dict[str, torch.Tensor] = {}
        hooks = [projection.register_forward_pre_hook(lambda _module, args: seen.__setitem__("x", args[0]))]
        if mlp_follows:
            reader = self.family.module(layer, self.family.mlp_norm or self.family.mlp)
            hooks.append(reader.register_forward_pre_hook(lambda _module, args: seen.__setitem__("stream", args[0])))
        try:
            for batch, ids in enumerate(self._batches()):
                captured = self._run(ids, [layer], types, state[batch], {"out": layer, "written": projection})
                stream = seen["stream"] if mlp_follows else captured["out"]
                rest = stream - captured["written"] * self.scale  # the stream without this projection's output
                y = (target[batch] - rest) / self.scale
                if projection.bias is not None:
                    y = y - projection.bias
                equations.add(seen["x"], y)
        finally:
            for hook in hooks:
                hook.remove()
        solved = equations.least_squares(self.ridge).T
        if torch.isfinite(solved).all():
            projection.weight.data = solved.to(projection.weight.dtype)

    # -- refits of narrowed sub-layers ------------------------------------------------------------

    def refit(self, layer: int, kind: str, narrowed: nn.Module, columns: Sequence[int]) -> None:
        """Refit, in place, the output projection of a narrowed sub-layer of dense layer `layer`:
        its kept `columns` become the least-squares fit of the dense projection's output on the
        dense model's own activations (a sub-block solve of that layer's Gram matrix)."""
        path = self._output_path(kind)
        dense = output_projection(self.dense_layers[layer], self.family, path).weight
        target = output_projection(narrowed, self.family, path)
        gram = self.gram(layer, kind)
        kept = torch.tensor(list(columns), device=gram.device)
        g_kk, g_nk = gram[kept][:, kept], gram[:, kept]
        strength = ridge_strength(g_kk, self.ridge)
        eye = torch.eye(len(columns), dtype=gram.dtype, device=gram.device)
        # W_K^T = (G_KK + s I)^-1 G_KN W^T, the normal equations of min ||X_K W_K^T - X W^T||^2
        solved = torch.linalg.solve(g_kk + strength * eye, g_nk.T @ dense.double().T).T
        if torch.isfinite(solved).all():
            target.weight.data = solved.to(target.weight.dtype)

    def removal_order(self, layer: int, kind: str, unit_size: int) -> list[int]:
        """Layer `layer`'s units of this kind (`unit_size` columns of its output projection each),
        from the one its refit misses most to the one it misses least. Units go in blocks of a
        128th of the layer's (one at a time below 256), so the order costs a few cubic solves."""
        path = self._output_path(kind)
        gram = self.gram(layer, kind)
        units = gram.shape[0] // unit_size
        return removal_order(gram, output_projection(self.dense_layers[layer], self.family, path).weight,
                             self.ridge, unit_size, block=max(1, units // 128))

    def _output_path(self, kind: str) -> str:
        """The output projection a sub-layer of this kind writes the residual stream through."""
        return self.family.o if kind == "attention" else self.family.down

    @torch.no_grad()
    def gram(self, layer: int, kind: str) -> torch.Tensor:
        """X^T X (fp64) of the dense input of layer `layer`'s output projection of this kind, over
        the repair blocks: both kinds from one run of that layer alone on its dense input."""
        key = (layer, kind)
        if key not in self._grams:
            dense, types = self.dense_states()[layer], self.dense_types
            sums: dict[str, torch.Tensor] = {}
            paths = {name: self._output_path(name) for name in ("attention", "mlp")}

            def accumulate(name: str):
                def hook(_module: nn.Module, args: tuple) -> None:
                    x = args[0].reshape(-1, args[0].shape[-1]).float()
                    product = (x.T @ x).double()
                    sums[name] = product if name not in sums else sums[name] + product
                return hook

            module = self.dense_layers[layer]
            hooks = [self.family.module(module, path).register_forward_pre_hook(accumulate(name))
                     for name, path in paths.items()]
            try:
                for batch, ids in enumerate(self._batches()):
                    self._run(ids, [module], None if types is None else [types[layer]], dense[batch], {})
            finally:
                for hook in hooks:
                    hook.remove()
            for name, total in sums.items():
                self._grams[(layer, name)] = total
                self._gram_bytes += total.numel() * total.element_size()
            while self._gram_bytes > self.cache_bytes and len(self._grams) > 2:
                _, dropped = self._grams.popitem(last=False)
                self._gram_bytes -= dropped.numel() * dropped.element_size()
        self._grams.move_to_end(key)
        return self._grams[key]
