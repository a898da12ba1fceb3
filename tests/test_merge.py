"""Merge with rotation: alignment is function-preserving, and fusing follows the rule."""
import pytest
import torch

from chromosomes import Block
from evaluators.merge import (
    Alignment, Geometry, LayerMerger, apply_alignment, build_layer, collect_activations, combine,
    compute_alignment, folded_params,
)
from evaluators.models import load_model
from evaluators.text import text_blocks

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def layer_output(model, layer, hidden):
    positions = torch.arange(hidden.shape[1])[None]
    with torch.no_grad():
        return layer(hidden, attention_mask=None, position_embeddings=model.model.rotary_emb(hidden, positions),
                     position_ids=positions)


@pytest.fixture(params=FAMILIES)
def dense(request, tiny_models, text_file):
    model, tokenizer = load_model(str(tiny_models[request.param]))
    blocks = text_blocks(str(text_file), tokenizer, 32, max_tokens=128)
    return model, collect_activations(model, list(model.model.layers), blocks, batch_size=2)


def test_alignment_alone_leaves_each_layer_output_unchanged(dense):
    model, activations = dense
    geometry = Geometry.of(model.config)
    hidden = torch.randn(2, 24, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for anchor, other in [(0, 1), (2, 4), (5, 3)]:
        alignment = compute_alignment(activations[anchor], activations[other], geometry)
        assert not torch.equal(alignment.mlp_order, torch.arange(alignment.mlp_order.numel()))  # it does permute
        layer = model.model.layers[other]
        aligned = build_layer(layer, apply_alignment(folded_params(layer), alignment, geometry))
        before, after = layer_output(model, layer, hidden), layer_output(model, aligned, hidden)
        assert torch.allclose(before, after, atol=1e-5, rtol=1e-5), (before - after).abs().max()


def test_alignment_brings_a_layer_closer_to_its_anchor(dense):
    """A permuted copy of the anchor must be recovered exactly: alignment undoes the permutation."""
    model, activations = dense
    geometry = Geometry.of(model.config)
    anchor = folded_params(model.model.layers[2])
    scramble = Alignment(torch.randperm(64, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 0]),
                         torch.linalg.qr(torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(2)))[0])
    copy = apply_alignment(anchor, scramble, geometry)
    shuffled = activations[2]
    shuffled_acts = type(shuffled)(
        shuffled.mlp[:, scramble.mlp_order],
        torch.einsum("thgk,gkj->thgj", shuffled.heads.view(-1, 2, 2, 8)[:, scramble.group_order.tolist()].permute(0, 2, 1, 3),
                     scramble.rotations).permute(0, 2, 1, 3).reshape(shuffled.heads.shape[0], -1),
    )
    recovered = apply_alignment(copy, compute_alignment(activations[2], shuffled_acts, geometry), geometry)
    for name, value in anchor.items():
        assert torch.allclose(recovered[name], value, atol=1e-4), name


def test_combine_rules():
    anchor = {"w": torch.tensor([1.0, 2.0])}
    others = [{"w": torch.tensor([3.0, 2.0])}, {"w": torch.tensor([2.0, 5.0])}]
    assert torch.equal(combine(anchor, others, "mean")["w"], torch.tensor([2.0, 3.0]))
    assert torch.equal(combine(anchor, others, "sum")["w"], torch.tensor([4.0, 5.0]))
    with pytest.raises(ValueError, match="unknown merge rule"):
        combine(anchor, others, "max")


def test_merger_caches_fused_layers_and_leaves_dense_layers_untouched(dense):
    model, activations = dense
    layers = list(model.model.layers)
    originals = {name: p.clone() for name, p in model.named_parameters()}
    merger = LayerMerger(layers, activations, Geometry.of(model.config), "mean", max_cached=2)
    first = merger(Block(1, (2, 3)))
    assert merger(Block(1, (2, 3))) is first
    merger(Block(0, (1,)))
    merger(Block(4, (5,)))  # evicts the oldest
    assert merger(Block(1, (2, 3))) is not first
    assert all(torch.equal(p, originals[name]) for name, p in model.named_parameters())
    assert first not in layers and not any(p.requires_grad for p in first.parameters())
