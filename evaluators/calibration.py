"""RMSNorm calibration: a few SGD steps on the norm weights of a stack, undone afterwards.

Removing layers shifts the scale of the residual stream that later layers see; the norm
weights are the cheapest knob that can re-scale it (a few thousand numbers per layer).
The fitness of a chromosome is then measured after this quick repair, and the weights are
restored exactly, so that the next chromosome starts from the same model.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from evaluators.families import LayerFamily
from evaluators.perplexity import nll_of_hidden


def norm_parameters(model: PreTrainedModel, layers: Sequence[nn.Module], family: LayerFamily) -> list[nn.Parameter]:
    """The norm weights the calibration may change: each layer's own norms (as its family names
    them; a removed sub-layer's are gone) and the final norm. Norms of q and k inside the
    attention stay fixed."""
    norms = [family.module(layer, name) for layer in layers for name in family.layer_norms]
    params = [norm.weight for norm in norms if getattr(norm, "weight", None) is not None]
    params.append(model.model.norm.weight)
    return params


@contextmanager
def calibrated_norms(
    model: PreTrainedModel, layers: Sequence[nn.Module], family: LayerFamily, blocks: torch.Tensor,
    steps: int, batch_size: int, lr: float, max_grad_norm: float = 1.0,
) -> Iterator[None]:
    """Within the block, the model (already viewing `layers`) has calibrated norm weights.

    Plain SGD: on SmolLM2-135M momentum 0.9, or lr >= 0.03, made some stacks diverge; the
    gradient-norm clip keeps an occasional steep first step from doing the same.

    The weights are trained and used in fp32 whatever the model's dtype: bf16 cannot hold an
    update of 1e-5 to a weight near 1 (one clipped step at lr 0.01 over Llama-3-8B's 266,240
    norm weights changes none of them in bf16). Each norm's output is cast back to the dtype of
    its input, so the rest of the model computes as before. The original tensors are put back
    afterwards, bit for bit.
    """
    params = norm_parameters(model, layers, family)
    originals = [p.data for p in params]
    modules = [m for m in model.modules() if any(getattr(m, "weight", None) is p for p in params)]
    hooks = [m.register_forward_hook(lambda _m, args, out: out.to(args[0].dtype)) for m in modules]
    device = next(model.parameters()).device
    try:
        for p in params:
            p.data = p.data.float().clone()  # the fp32 master copy, used in the forward pass too
            p.requires_grad_(True)
        optimizer = torch.optim.SGD(params, lr=lr)
        for step in range(steps):
            start = (step * batch_size) % blocks.shape[0]
            ids = blocks[start:start + batch_size].to(device)
            with torch.enable_grad():
                hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
                loss = nll_of_hidden(model, hidden, ids) / (ids.shape[0] * (ids.shape[1] - 1))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for p, original in zip(params, originals):
            p.data = original
            p.grad = None
            p.requires_grad_(False)
