"""ShortGPT's Block Influence: a layer whose output barely differs from its input matters little."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel


@torch.no_grad()
def block_influence(model: PreTrainedModel, layers: Sequence[nn.Module], blocks: torch.Tensor,
                    batch_size: int) -> list[float]:
    """Per layer: 1 - mean cosine similarity between its input and output hidden states (dense model)."""
    totals = [0.0] * len(layers)
    count = 0

    def recorder(index: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            cosine = F.cosine_similarity(args[0].float(), output.float(), dim=-1)
            totals[index] += float((1.0 - cosine).sum())
        return hook

    handles = [layer.register_forward_hook(recorder(i)) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        for start in range(0, blocks.shape[0], batch_size):
            ids = blocks[start:start + batch_size].to(device)
            model.model(input_ids=ids, use_cache=False)
            count += ids.numel()
    finally:
        for handle in handles:
            handle.remove()
    return [total / count for total in totals]
