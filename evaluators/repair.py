"""Seam repair: a closed-form, training-free fix of every cut, folded into the weights.

Where a chromosome removes layers a+1..t after a kept layer a, the residual stream after a no
longer looks like the dense model's after t. Layer a's MLP writes into that stream through
`down_proj`, so a linear map T on the MLP output can move a's output towards the dense one:

    out_a = h_mid + mlp(h_mid)        (h_mid: the residual after a's attention)
    fit T to minimise || h_mid + mlp(h_mid) T - dense_t ||^2 + ridge * ||T - I||^2

and fold it into the weights, down_proj.W <- T^T W (bias b <- T^T b): same architecture, same
parameter count, a plain Hugging Face model (ReplaceMe and LinearPatch fold such maps too).
The normal equations are accumulated in fp64 over batches, so memory grows with hidden^2 and
never with the number of tokens. Every token counts, the first of each window too: leaving
that attention-sink token out let the map corrupt it, and perplexity rose (473 against 53.6
unrepaired, SmolLM2-135M, 8 of 30 layers).

Variants (`--repair`; experiments/repair_variants chose `lsq` on dev text):
- `lsq`: the full map above, folded into down_proj;
- `lsq-attn`: first a map on the attention output, folded into o_proj, then, on the layer as
  it now computes, the map on the MLP output (each stage closed form);
- `scale`: LinearPatch-style, a channel scaling in a rotated basis, T = Q diag(d) Q^T with Q a
  fixed random orthogonal matrix (the rotation spreads outlier channels; a Hadamard matrix
  does the same where the hidden size allows one): hidden values to fit instead of hidden^2.
`--repair-min-run N` repairs only the seams where at least N layers were removed.

A seam is fitted on the dense model's input to its block (`dense`: a fit depends on the block
and its target alone, so a search shares it among chromosomes) or on the cut model's own
input, earlier seams already repaired (`pruned`: a fit depends on the stack's prefix, and
chromosomes sharing leading layers share it). Fits are cached within a byte budget.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from evaluators.families import LayerFamily, LayoutError
from evaluators.perplexity import Replay
from evaluators.surgery import LayerStack, layer_view

REPAIRS: tuple[str, ...] = ("none", "lsq", "lsq-attn", "scale")
REPAIR_INPUTS: tuple[str, ...] = ("pruned", "dense")
PROBE_TOKENS = 32  # tokens the layout check runs on

# Memory for cached fits (each a new down_proj, and with pruned inputs the repaired block's output
# on the repair tokens): an 8B model's down_proj alone is 117 MB in bf16, so count bytes, not fits.
CACHE_BYTES = 2 * 1024**3


class RepairError(ValueError):
    """The model's layers cannot be repaired this way; the message says why."""


@dataclass(frozen=True)
class RepairedLayer:
    """Key of a repaired module: the raw block key, and the dense layer whose output it imitates."""

    block: Hashable
    target: int


def seam_targets(stack: LayerStack, num_layers: int, min_run: int = 1) -> list[tuple[int, int]]:
    """(position in the stack, dense layer to imitate) for every kept block followed by at least
    `min_run` removed layers.

    The target is the last dense layer before the next kept block's anchor (or the model's last
    layer); layers merged into the block count as removed, since the fused layer is not them.
    """
    anchors = [block.anchor for block in stack.plan] + [num_layers]
    return [(k, anchors[k + 1] - 1) for k in range(len(stack.plan)) if anchors[k + 1] - 1 - anchors[k] >= min_run]


def mlp_output_projection(layer: nn.Module, family: LayerFamily) -> nn.Linear:
    """The linear map that writes a decoder layer's MLP output into the residual stream."""
    if family.experts:
        raise RepairError(f"seam repair is not supported for {type(layer).__name__}: its MLP is a mixture of "
                          "experts, with no single output projection to fold a map into (use --repair none)")
    if family.mlp_output_norm:
        raise RepairError(f"seam repair is not supported for {type(layer).__name__}: a norm "
                          f"({family.mlp_output_norm}) follows its MLP, so a map folded into {family.down} would "
                          "be normalised away (use --repair none)")
    return _linear(layer, family, family.down, "use --repair none")


def output_projection(layer: nn.Module, family: LayerFamily, path: str) -> nn.Linear:
    """The linear map at `path` (down_proj, or o_proj for lsq-attn) that writes into the residual stream."""
    mlp_output_projection(layer, family)
    return _linear(layer, family, path, "use --repair none" if path == family.down else "use --repair lsq")


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
    by `transform` [H, H] (W <- T^T W).

    Only the modules on the way to that projection are new objects; every other submodule is the
    dense layer's own, so a repaired view costs one hidden x intermediate matrix, not a whole layer.
    """
    path = path or family.down
    down = output_projection(layer, family, path)
    t = transform.to(torch.float64)
    new_down = nn.Linear(down.in_features, down.out_features, bias=down.bias is not None,
                         device=down.weight.device, dtype=down.weight.dtype)
    with torch.no_grad():
        new_down.weight.copy_((t.T @ down.weight.double()).to(down.weight.dtype))
        if down.bias is not None:
            new_down.bias.copy_((t.T @ down.bias.double()).to(down.bias.dtype))
    new_down.requires_grad_(False)
    return family.replaced(layer, path, new_down)


@torch.no_grad()
def check_mlp_output_is_added(model: PreTrainedModel, layer: nn.Module, ids: torch.Tensor,
                              family: LayerFamily) -> None:
    """Refuse a family whose layer does not add its MLP output to the residual stream as it is.

    The fit assumes layer output = (everything else) + MLP output, so that a map on the MLP
    output moves the layer output by exactly as much. A norm after the MLP (Gemma's
    post-feedforward norm) breaks that, and a map folded into down_proj would not do what was
    fitted. Doubling the MLP output must move the layer output by one MLP output: checked once,
    on a few tokens.
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
    mlp = captured["mlp"].float()
    error = float((moved - mlp).norm() / mlp.norm().clamp_min(1e-12))
    if not error < 1e-3:
        raise RepairError(f"seam repair is not supported for {type(model).__name__}: its layers do not add the MLP "
                          f"output to the residual stream as it is (a norm after the MLP?; doubling it moved the "
                          f"layer output {error:.2f} away from one MLP output), so a map folded into down_proj "
                          "would not do what was fitted; use --repair none")


class NormalEquations:
    """Running X^T X and X^T Y in fp64 for the ridge problem min ||X T - Y||^2 + ridge ||T - I||^2."""

    def __init__(self, size: int, device: torch.device):
        self.xx = torch.zeros(size, size, dtype=torch.float64, device=device)
        self.xy = torch.zeros(size, size, dtype=torch.float64, device=device)
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
        """The ridge relative to the mean diagonal of X^T X, so it means the same at every scale."""
        return ridge * float(torch.diagonal(self.xx).mean()) + 1e-12


def random_rotation(size: int, seed: int = 0) -> torch.Tensor:
    """A fixed random orthogonal matrix (QR of a seeded Gaussian, signs made unique), fp64."""
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


class SeamRepairer:
    """Fits and caches seam repairs of layer stacks on fixed calibration blocks."""

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
        self.paths = (family.o, family.down) if method == "lsq-attn" else (family.down,)
        for layer in dense_layers:
            for path in self.paths:  # refuse an unsupported layout before any work
                output_projection(layer, family, path)
        check_mlp_output_is_added(model, dense_layers[0], blocks[:1, :PROBE_TOKENS], family)
        self.model = model
        self.family = family
        self.dense_layers = list(dense_layers)
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
        # [depth][batch]: the dense residual stream after `depth` layers (0: the embeddings)
        self._dense: list[list[torch.Tensor]] | None = None
        # what a fit depends on -> (repaired module, its output per batch); with pruned inputs that
        # is the stack's key prefix through the repaired block, with dense inputs the block alone
        self._fitted: OrderedDict[Hashable, tuple[nn.Module, list[torch.Tensor]]] = OrderedDict()

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
            try:
                for ids in self._batches():
                    self.model.model(input_ids=ids, use_cache=False)
            finally:
                for hook in hooks:
                    hook.remove()
            self._dense = states
        return self._dense

    def repaired(self, stack: LayerStack) -> LayerStack:
        """The stack with every seam repaired (cached fits reused, new ones fitted in order).

        With pruned inputs, each seam is fitted on what the cut model (earlier seams repaired)
        feeds it: exact, at the cost of one forward of the new chromosome's layers over the repair
        tokens. With dense inputs, a seam is fitted on the dense model's input to its block, so a
        fit depends only on (block, target) and a search soon has every fit it needs cached.
        """
        seams = seam_targets(stack, len(self.dense_layers), self.min_run)
        dense_inputs = self.inputs == "dense"
        modules, keys = list(stack.modules), list(stack.keys)
        state: list[torch.Tensor] | None = None  # output of the last repaired seam, per batch
        done = 0  # blocks of the stack that `state` has passed through
        for position, target in seams:
            keys[position] = RepairedLayer(stack.keys[position], target)
            key = keys[position] if dense_inputs else tuple(keys[:position + 1])
            if key in self._fitted:
                self._fitted.move_to_end(key)
                modules[position], state = self._fitted[key]
            else:
                if dense_inputs:
                    segment, start, state = [modules[position]], position, self.dense_states()[stack.plan[position].anchor]
                else:
                    segment, start = modules[done:position + 1], done
                modules[position], state = self._fit(segment, stack, start, state, target)
                self._remember(key, modules[position], [] if dense_inputs else state)
            done = position + 1
        return LayerStack(stack.plan, tuple(keys), tuple(modules), stack.layer_types)

    def _remember(self, key: Hashable, module: nn.Module, state: list[torch.Tensor]) -> None:
        """Cache a fit, dropping the least recently used ones beyond the cache's byte budget."""
        self._fitted[key] = (module, state)
        self._cached_bytes += self._entry_bytes(module, state)
        while self._cached_bytes > self.cache_bytes and len(self._fitted) > 1:
            _, (old_module, old_state) = self._fitted.popitem(last=False)
            self._cached_bytes -= self._entry_bytes(old_module, old_state)

    @torch.no_grad()
    def _fit(self, segment: list[nn.Module], stack: LayerStack, start: int, state: list[torch.Tensor] | None,
             target: int) -> tuple[nn.Module, list[torch.Tensor]]:
        """Run `segment` (ending with the block to repair) from `state`, fit its output maps, fold them.

        Each map (o_proj's, then down_proj's for lsq-attn) is fitted on the layer as the maps
        before it left it, so the last fit sees exactly what the repaired layer computes. Returns
        the repaired module and its output on every batch, the next segment's start.
        """
        dense = self.dense_states()[target + 1]
        layer, outputs = segment[-1], []
        for path in self.paths:
            equations = NormalEquations(self.model.config.hidden_size, self.device)
            outputs, writes = [], []
            for batch, ids in enumerate(self._batches()):
                out, written = self._run(ids, [*segment[:-1], layer], stack, start,
                                         None if state is None else state[batch], path)
                rest = out - written  # what the layer adds besides this projection's output
                equations.add(written, dense[batch] - rest)
                outputs.append(rest)
                writes.append(written)
            transform = self._solve(equations)
            layer = with_output_map(layer, transform, self.family, path)
        t = transform.to(writes[0].dtype)
        return layer, [rest + written @ t for rest, written in zip(outputs, writes)]

    def _solve(self, equations: NormalEquations) -> torch.Tensor:
        """The configured map; the identity (the seam left as cut) if activations were not finite."""
        if self.rotation is not None:
            transform = equations.solve_scaling(self.ridge, self.rotation)
        else:
            transform = equations.solve(self.ridge)
        if not torch.isfinite(transform).all():
            transform = torch.eye(transform.shape[0], dtype=transform.dtype, device=transform.device)
        return transform

    def _run(self, ids: torch.Tensor, segment: list[nn.Module], stack: LayerStack, start: int,
             state: torch.Tensor | None, path: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Output of the segment's last layer, and of that layer's projection at `path`, on one batch."""
        modules, types = list(segment), None
        if stack.layer_types is not None:
            types = list(stack.layer_types[start:start + len(segment)])
        if state is not None:
            modules.insert(0, Replay(state))
            if types is not None:
                types.insert(0, types[0])  # the replayed layers' attention type does not matter
        captured: dict[str, torch.Tensor] = {}
        last = segment[-1]
        hooks = [last.register_forward_hook(lambda _m, _a, out: captured.__setitem__("out", out)),
                 self.family.module(last, path).register_forward_hook(
                     lambda _m, _a, out: captured.__setitem__("written", out))]
        try:
            with layer_view(self.model, modules, types):
                self.model.model(input_ids=ids, use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        out = captured["out"]
        return (out[0] if isinstance(out, tuple) else out), captured["written"]

    def _entry_bytes(self, module: nn.Module, state: list[torch.Tensor]) -> int:
        weights = [output_projection(module, self.family, path).weight for path in self.paths]
        return sum(t.numel() * t.element_size() for t in [*weights, *state])
