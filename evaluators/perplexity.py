"""Perplexity by the standard protocol, and a scorer that shares work between similar stacks.

Protocol: the running text is cut into non-overlapping windows of `seq_len` tokens; each
window predicts its tokens 2..seq_len from the ones before; perplexity is exp of the mean
negative log-likelihood over all predicted tokens. No KV cache, no gradients.
"""
from __future__ import annotations

import math
from typing import Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from evaluators.surgery import LayerStack, layer_view

LOGIT_CHUNK = 4096  # tokens per lm_head chunk: bounds the [tokens, vocab] logits in memory


def nll_of_hidden(model: PreTrainedModel, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL (fp32) of final hidden states [B, L, H] against ids [B, L]."""
    return token_losses(model, hidden, ids)[0]


@torch.no_grad()
def final_hidden(model: PreTrainedModel, blocks: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The model's final hidden states on the blocks [n, L, H]: a reference far smaller than its
    logits over a large vocabulary."""
    device = next(model.parameters()).device
    return torch.cat([model.model(input_ids=blocks[s:s + batch_size].to(device), use_cache=False).last_hidden_state
                      for s in range(0, blocks.shape[0], batch_size)])


@torch.no_grad()
def fidelity(model: PreTrainedModel, blocks: torch.Tensor, batch_size: int, reference: torch.Tensor,
             reference_head: torch.nn.Module | None = None) -> dict[str, float]:
    """Perplexity, the mean KL(dense || model) per predicted token and the share of tokens whose
    most likely next token is the dense model's, against the dense final hidden states `reference`
    through `reference_head` (default: the model's own, which pruning leaves as it was)."""
    device = next(model.parameters()).device
    totals = [0.0, 0.0, 0.0]
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start:start + batch_size].to(device)
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        for index, value in enumerate(token_losses(model, hidden, ids, reference[start:start + batch_size].to(device),
                                                             reference_head)):
            totals[index] += float(value)
    count = predicted_tokens(blocks)
    return {"perplexity": math.exp(totals[0] / count), "kl": totals[1] / count, "top1": totals[2] / count}


def token_losses(model: PreTrainedModel, hidden: torch.Tensor, ids: torch.Tensor, reference: torch.Tensor | None = None,
                 reference_head: torch.nn.Module | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Summed next-token NLL, and with the dense model's final hidden states `reference` [B, L, H]
    the summed KL(dense || pruned) of the next-token distributions (fp32) and the number of tokens
    whose most likely next token is the dense model's.

    The dense side is kept as hidden states, not logits: its log-probabilities are recomputed
    chunk by chunk, so a large vocabulary never needs tokens x vocab floats in memory.
    """
    head = model.get_output_embeddings()
    dense_head = reference_head or head
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    dense = None if reference is None else reference[:, :-1].reshape(-1, reference.shape[-1])
    targets = ids[:, 1:].reshape(-1)
    nll = hidden.new_zeros((), dtype=torch.float32)
    kl = agree = None if dense is None else hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), LOGIT_CHUNK):
        chunk = slice(start, start + LOGIT_CHUNK)
        logits = head(states[chunk]).float()  # on the head's device (with a model spread over GPUs, its own)
        nll = nll + F.cross_entropy(logits, targets[chunk].to(logits.device), reduction="sum").to(nll.device)
        if dense is not None:
            log_p = F.log_softmax(logits, dim=-1)
            log_q = F.log_softmax(dense_head(dense[chunk].to(dense_head.weight.device)).float(), dim=-1).to(log_p.device)
            kl = kl + F.kl_div(log_p, log_q, log_target=True, reduction="sum").to(kl.device)
            agree = agree + (log_p.argmax(-1) == log_q.argmax(-1)).sum().to(agree.device)
    return nll, kl, agree


def predicted_tokens(blocks: torch.Tensor) -> int:
    return blocks.shape[0] * (blocks.shape[1] - 1)


@torch.no_grad()
def perplexity(model: PreTrainedModel, blocks: torch.Tensor, batch_size: int = 4, progress: bool = False) -> tuple[float, float]:
    """(perplexity, mean NLL) of the model as it stands on the given blocks."""
    device = next(model.parameters()).device
    starts = range(0, blocks.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="perplexity", unit="batch", leave=False)
    total = 0.0
    for start in starts:
        ids = blocks[start:start + batch_size].to(device)
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        total += float(nll_of_hidden(model, hidden, ids))
    mean = total / predicted_tokens(blocks)
    return math.exp(mean), mean


class Replay(nn.Module):
    """Stands in for a stack's leading layers: returns their output, saved from an earlier pass."""

    def __init__(self, state: torch.Tensor | None = None) -> None:
        super().__init__()
        self.state = state

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.state


class PrefixScorer:
    """Scores layer stacks on fixed blocks, reusing the hidden states of the layers a stack
    shares with the stack scored just before it.

    Callers sort stacks so that neighbours share long prefixes. The saved states cost
    tokens x hidden x depth floats; the result is bit-for-bit what a full forward gives,
    because the shared layers would have computed the very same tensors.
    """

    def __init__(self, model: PreTrainedModel, blocks: torch.Tensor, batch_size: int,
                 reference: torch.Tensor | None = None):
        self.model = model
        self.blocks = blocks
        self.reference = reference  # dense final hidden states of the blocks, for KL (None: NLL only)
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self._path: tuple[Hashable, ...] = ()
        self._states: list[list[torch.Tensor]] = []  # [batch][depth] hidden after depth+1 layers
        self._replay = Replay()

    @torch.no_grad()
    def losses(self, stack: LayerStack, share: bool = True) -> tuple[float, float | None, int]:
        """Summed NLL, summed KL from the dense model (None without a reference) and number of
        predicted tokens of the stack on all blocks."""
        keys = stack.keys
        shared = _common_prefix(keys, self._path) if share else 0
        shared = min(shared, len(keys))
        total, divergence = 0.0, None if self.reference is None else 0.0
        new_states: list[list[torch.Tensor]] = []
        for batch_index, start in enumerate(range(0, self.blocks.shape[0], self.batch_size)):
            ids = self.blocks[start:start + self.batch_size].to(self.device)
            kept = self._states[batch_index][:shared] if shared else []
            hidden, fresh = self._forward(ids, stack, shared, kept[-1] if kept else None, record=share)
            reference = None if self.reference is None else self.reference[start:start + self.batch_size].to(self.device)
            nll, kl, _ = token_losses(self.model, hidden, ids, reference)
            total += float(nll)
            if kl is not None:
                divergence += float(kl)
            new_states.append(kept + fresh)
        if share:
            self._path, self._states = keys, new_states
        return total, divergence, predicted_tokens(self.blocks)

    def _forward(self, ids: torch.Tensor, stack: LayerStack, shared: int, state: torch.Tensor | None,
                 record: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        modules = list(stack.modules[shared:])
        types = None if stack.layer_types is None else list(stack.layer_types[shared:])
        if state is not None:
            self._replay.state = state
            modules.insert(0, self._replay)
            if types is not None:
                types.insert(0, stack.layer_types[shared - 1])
        fresh: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda _m, _a, out: fresh.append(out)) for m in stack.modules[shared:]] if record else []
        try:
            with layer_view(self.model, modules, types):
                hidden = self.model.model(input_ids=ids, use_cache=False).last_hidden_state
        finally:
            for hook in hooks:
                hook.remove()
            self._replay.state = None
        return hidden, fresh


def _common_prefix(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length
