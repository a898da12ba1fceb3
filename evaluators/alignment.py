"""Aligning one layer to another: which MLP unit and which key-value head of layer j plays the
part of which in its anchor a, and how each head's value space turns into the anchor's.

Alignment reads both layers' activations on the same calibration tokens, but never keeps them:
one dense forward (stopped after layer j) streams each batch into sufficient statistics on the
model's device, in fp32:
- MLP units (the input of down_proj): sums, sums of squares and the cross products a^T b, all
  shifted by the first batch's mean so that fp32 keeps the centred values' precision; their
  correlation follows in closed form;
- heads (the input of o_proj): per pair of key-value groups the cross product of their query
  heads' outputs, what the orthogonal Procrustes fit of one group onto another needs.
Memory is units^2 floats (822 MB for Llama-3-8B's 14,336 units), whatever the token count.

Units are then matched by an assignment that maximises their summed correlation: the Hungarian
method (scipy's, exact, on one CPU thread), or a greedy matching refined by pairwise swaps,
which keeps nearly all of the optimal total and is made of whole-matrix steps a GPU runs in
parallel (`ASSIGNMENTS`; times and totals: experiments/results/alignment_scale). `auto` takes the greedy matching on a GPU above HUNGARIAN_UNITS
and the Hungarian method everywhere else. Finished alignments can be kept on disk
(`AlignmentCache`), so that actors share them and a resumed run reuses them.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from evaluators.config import ASSIGNMENTS
from evaluators.families import Geometry, LayerFamily
from gaprune.files import write_atomic

# Above this many units on a GPU `auto` matches greedily: the Hungarian method's time grows
# steeply with the units on one CPU thread (experiments/results/alignment_scale.*), while the
# greedy steps run on the device.
HUNGARIAN_UNITS = 4096
SWAP_PASSES = 50  # at most this many rounds of pairwise swaps after the greedy matching
GREEDY_ROUNDS = 64  # rounds of mutually best pairs; units still unmatched (ties: dead units) go in order


@dataclass(frozen=True)
class Alignment:
    """How to re-express a layer in its anchor's basis."""

    mlp_order: torch.Tensor  # [intermediate]: new unit u is old unit mlp_order[u]
    group_order: torch.Tensor  # [kv_heads]: new group g is old group group_order[g]
    rotations: torch.Tensor  # [kv_heads, head_dim, head_dim]: applied to new group g's value space

    @classmethod
    def identity(cls, intermediate: int, geometry: Geometry) -> "Alignment":
        eye = torch.eye(geometry.head_dim).expand(geometry.kv_heads, -1, -1).clone()
        return cls(torch.arange(intermediate), torch.arange(geometry.kv_heads), eye)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mlp_order": self.mlp_order.cpu(), "group_order": self.group_order.cpu(),
                "rotations": self.rotations.float().cpu().contiguous()}


class _Enough(Exception):
    """Raised by a hook once the layers of interest have seen their batch: the rest of the forward is not needed."""


class Moments:
    """Streamed sums for the correlation of two sets of units on the same tokens (fp32)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.shift_a = self.shift_b = None
        self.sum_a = self.sum_b = self.square_a = self.square_b = self.cross = None

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """a [tokens, n], b [tokens, m]: one batch of both layers' units."""
        a, b = a.float(), b.float()
        if self.shift_a is None:
            self.shift_a, self.shift_b = a.mean(0), b.mean(0)
            n, m = a.shape[1], b.shape[1]
            self.sum_a, self.square_a = a.new_zeros(n), a.new_zeros(n)
            self.sum_b, self.square_b = b.new_zeros(m), b.new_zeros(m)
            self.cross = a.new_zeros(n, m)
        a, b = a - self.shift_a, b - self.shift_b
        self.tokens += a.shape[0]
        self.sum_a += a.sum(0)
        self.sum_b += b.sum(0)
        self.square_a += a.square().sum(0)
        self.square_b += b.square().sum(0)
        self.cross.addmm_(a.T, b)

    def correlation(self) -> torch.Tensor:
        """[n, m]: Pearson correlation of every unit of a with every unit of b."""
        mean_a, mean_b = self.sum_a / self.tokens, self.sum_b / self.tokens
        covariance = self.cross - self.tokens * torch.outer(mean_a, mean_b)
        norm_a = (self.square_a - self.tokens * mean_a.square()).clamp_min(1e-12).sqrt()
        norm_b = (self.square_b - self.tokens * mean_b.square()).clamp_min(1e-12).sqrt()
        return covariance / norm_a[:, None] / norm_b[None, :]


def group_cross(anchor: torch.Tensor, other: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """[kv, kv, d, d]: for group h of `other` and group g of the anchor, the sum over tokens and
    the group's query heads of other^T anchor (heads' outputs [tokens, heads * head_dim])."""
    g, r, d = geometry.kv_heads, geometry.group_size, geometry.head_dim
    a = anchor.float().reshape(-1, g, r, d)
    o = other.float().reshape(-1, g, r, d)
    return torch.einsum("thri,tgrj->hgij", o, a)


@torch.no_grad()
def pair_statistics(model: nn.Module, layers: Sequence[nn.Module], family: LayerFamily, geometry: Geometry,
                    blocks: torch.Tensor, batch_size: int, anchor: int, other: int) -> tuple[Moments, torch.Tensor]:
    """MLP moments and head-group cross products of layers `anchor` and `other` on the dense model,
    streamed batch by batch (each batch's forward stops after the later of the two)."""
    moments, heads = Moments(), None
    seen: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            seen[name] = args[0].reshape(-1, args[0].shape[-1])
        return hook

    def stop(_module: nn.Module, _args: tuple, _out) -> None:
        raise _Enough

    handles = [family.module(layers[anchor], family.down).register_forward_pre_hook(record("mlp a")),
               family.module(layers[anchor], family.o).register_forward_pre_hook(record("heads a")),
               family.module(layers[other], family.down).register_forward_pre_hook(record("mlp b")),
               family.module(layers[other], family.o).register_forward_pre_hook(record("heads b")),
               layers[max(anchor, other)].register_forward_hook(stop)]
    device = next(model.parameters()).device
    try:
        for start in range(0, blocks.shape[0], batch_size):
            seen.clear()
            try:
                model.model(input_ids=blocks[start:start + batch_size].to(device), use_cache=False)
            except _Enough:
                pass
            a, b = seen["mlp a"], seen["mlp b"].to(seen["mlp a"].device)
            moments.add(a, b)
            cross = group_cross(seen["heads a"], seen["heads b"].to(seen["heads a"].device), geometry)
            heads = cross if heads is None else heads + cross
    finally:
        for handle in handles:
            handle.remove()
    return moments, heads


def procrustes(cross: torch.Tensor) -> tuple[torch.Tensor, float]:
    """For cross = source^T target: the rotation R minimising ||source R - target|| and the fit
    it achieves (the nuclear norm)."""
    u, s, vh = torch.linalg.svd(cross.double())
    return (u @ vh).float(), float(s.sum())


def match_head_groups(cross: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group order and per-group value rotations from group_cross sums (Hungarian: kv x kv is tiny)."""
    kv = cross.shape[0]
    fit = torch.tensor([[procrustes(cross[h, g])[1] for h in range(kv)] for g in range(kv)])
    rows, columns = linear_sum_assignment(fit.numpy(), maximize=True)
    order = torch.as_tensor(columns[rows.argsort()], dtype=torch.long)
    rotations = torch.stack([procrustes(cross[order[g], g])[0] for g in range(kv)]).cpu()
    return order, rotations


def hungarian(similarity: torch.Tensor) -> torch.Tensor:
    """order[u]: the column matched to row u, maximising the summed similarity exactly."""
    rows, columns = linear_sum_assignment(similarity.double().cpu().numpy(), maximize=True)
    return torch.as_tensor(columns[rows.argsort()], dtype=torch.long)


def greedy(similarity: torch.Tensor) -> torch.Tensor:
    """order[u]: a matching built on the device from mutually best pairs, round by round (what a
    greedy pass over all pairs in order of similarity gives), then improved by pairwise swaps."""
    n = similarity.shape[0]
    device = similarity.device
    order = torch.full((n,), -1, dtype=torch.long, device=device)
    rows, columns = torch.arange(n, device=device), torch.arange(n, device=device)
    for _ in range(GREEDY_ROUNDS):
        if not rows.numel():
            break
        sub = similarity[rows][:, columns]
        best_column = sub.argmax(1)
        mutual = sub.argmax(0)[best_column] == torch.arange(rows.numel(), device=device)
        order[rows[mutual]] = columns[best_column[mutual]]
        taken = torch.zeros(columns.numel(), dtype=torch.bool, device=device)
        taken[best_column[mutual]] = True
        rows, columns = rows[~mutual], columns[~taken]
    order[rows] = columns
    return improve_by_swaps(similarity, order).cpu()


def improve_by_swaps(similarity: torch.Tensor, order: torch.Tensor, passes: int = SWAP_PASSES) -> torch.Tensor:
    """Swap the columns of row pairs while that raises the summed similarity: each pass takes the
    mutually best swaps of the gain matrix G[i, j] = S[i, o_j] + S[j, o_i] - S[i, o_i] - S[j, o_j]."""
    n = order.numel()
    index = torch.arange(n, device=order.device)
    for _ in range(passes):
        permuted = similarity[:, order]  # [i, j] = S[i, o_j]
        kept = permuted.diagonal()
        gain = permuted + permuted.T - kept[:, None] - kept[None, :]
        gain.fill_diagonal_(0)
        partner = gain.argmax(1)
        best = gain[index, partner]
        mutual = (partner[partner] == index) & (best > 1e-7) & (index < partner)
        if not mutual.any():
            break
        first, second = index[mutual], partner[mutual]
        order[first], order[second] = order[second].clone(), order[first].clone()
    return order


def resolved_assignment(method: str, units: int, device: torch.device) -> str:
    """The assignment used for `units` MLP units whose statistics live on `device`: `auto` is
    greedy on a GPU above HUNGARIAN_UNITS, Hungarian otherwise."""
    if method not in ASSIGNMENTS:
        raise ValueError(f"assignment must be one of {', '.join(ASSIGNMENTS)}, got {method!r}")
    if method != "auto":
        return method
    return "greedy" if device.type == "cuda" and units > HUNGARIAN_UNITS else "hungarian"


def assign(similarity: torch.Tensor, method: str = "auto") -> torch.Tensor:
    if resolved_assignment(method, similarity.shape[0], similarity.device) == "hungarian":
        return hungarian(similarity)
    return greedy(similarity)


def auto_align_tokens(units: int, seq_len: int) -> int:
    """Enough calibration tokens for `units` MLP units (a correlation of n units needs at least n
    tokens to be of full rank), and no fewer than 2,048, in whole windows."""
    return -(-max(2048, units) // seq_len) * seq_len


def compute_alignment(moments: Moments, heads: torch.Tensor, method: str = "auto") -> Alignment:
    group_order, rotations = match_head_groups(heads)
    return Alignment(assign(moments.correlation(), method), group_order, rotations)


class AlignmentCache:
    """Alignments on disk (safetensors, written atomically), keyed by a digest of what they depend
    on and the layer pair: every actor of a run reads what any has written, and so does a resumed run."""

    def __init__(self, folder: str | Path, depends_on: dict):
        self.folder = Path(folder)
        self.digest = hashlib.sha256(json.dumps(depends_on, sort_keys=True).encode()).hexdigest()[:16]

    def path(self, anchor: int, other: int) -> Path:
        return self.folder / f"{self.digest}-{anchor}-{other}.safetensors"

    def get(self, anchor: int, other: int) -> Alignment | None:
        from safetensors.torch import load_file

        path = self.path(anchor, other)
        if not path.is_file():
            return None
        tensors = load_file(str(path))
        return Alignment(tensors["mlp_order"], tensors["group_order"], tensors["rotations"])

    def put(self, anchor: int, other: int, alignment: Alignment) -> None:
        from safetensors.torch import save

        write_atomic(self.path(anchor, other), lambda stream: stream.write(save(alignment.tensors())))
