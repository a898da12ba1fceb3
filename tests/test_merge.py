"""Merge with rotation: alignment is function-preserving, and fusing follows the rule."""
import dataclasses

import pytest
import torch

from chromosomes import Block
from evaluators.fitness import EvaluatorConfig, ModelEvaluator
from evaluators.families import FAMILIES as FAMILY_REGISTRY, Geometry, discover, family_of
from evaluators.merge import (
    ALIGNMENT_TOLERANCE, Alignment, LayerMerger, MergeError, apply_alignment, build_layer,
    collect_activations, combine, compute_alignment, folded_params, record_layer_inputs,
)
from evaluators.models import load_model
from evaluators.text import text_blocks
from tests.tiny import FAMILIES as ALL_FAMILIES, MERGEABLE

FAMILIES = list(MERGEABLE)


def layer_output(layer, probe):
    """The layer's output on the call the model made to it (each family's own masks and rotary
    embeddings), with random hidden states in place of the recorded ones."""
    hidden = torch.randn(probe.hidden().shape, generator=torch.Generator().manual_seed(0))
    kwargs = {key: value for key, value in probe.kwargs.items() if key != "hidden_states"}
    with torch.no_grad():
        out = layer(hidden, *probe.args[1:], **kwargs)
    return out[0] if isinstance(out, tuple) else out


@pytest.fixture(params=FAMILIES)
def dense(request, tiny_models, text_file):
    model, tokenizer = load_model(str(tiny_models[request.param]))
    blocks = text_blocks(str(text_file), tokenizer, 32, max_tokens=128)
    return model, collect_activations(model, list(model.model.layers), blocks, batch_size=2, family=family_of(model))


def test_alignment_alone_leaves_each_layer_output_unchanged(dense):
    model, activations = dense
    geometry, family = Geometry.of(model.config), family_of(model)
    probes = record_layer_inputs(model, list(model.model.layers), torch.arange(24)[None] % model.config.vocab_size)
    for anchor, other in [(0, 1), (2, 4), (5, 3)]:
        alignment = compute_alignment(activations[anchor], activations[other], geometry)
        assert not torch.equal(alignment.mlp_order, torch.arange(alignment.mlp_order.numel()))  # it does permute
        layer = model.model.layers[other]
        aligned = build_layer(layer, apply_alignment(folded_params(layer, family, geometry), alignment, geometry), family)
        before, after = layer_output(layer, probes[other]), layer_output(aligned, probes[other])
        assert torch.allclose(before, after, atol=1e-5, rtol=1e-5), (before - after).abs().max()


def test_alignment_brings_a_layer_closer_to_its_anchor(dense):
    """A permuted copy of the anchor must be recovered exactly: alignment undoes the permutation."""
    model, activations = dense
    geometry = Geometry.of(model.config)
    anchor = folded_params(model.model.layers[2], family_of(model), geometry)
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
    merger = LayerMerger(layers, activations, Geometry.of(model.config), family_of(model), "mean", max_cached=2)
    first = merger(Block(1, (2, 3)))
    assert merger(Block(1, (2, 3))) is first
    merger(Block(0, (1,)))
    merger(Block(4, (5,)))  # evicts the oldest
    assert merger(Block(1, (2, 3))) is not first
    assert all(torch.equal(p, originals[name]) for name, p in model.named_parameters())
    assert first not in layers and not any(p.requires_grad for p in first.parameters())


def scorer(folder, text_file):
    return ModelEvaluator(EvaluatorConfig(model=str(folder), data=str(text_file), seq_len=32, score_tokens=128,
                                          align_tokens=64, batch_size=2, repair_tokens=256, repair="none"))


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_aligned_layer_is_checked_and_a_mixture_of_experts_is_refused(family, tiny_models, text_file):
    evaluator = scorer(tiny_models[family], text_file)
    merging = [1, 2, 1, 0, 1, 2]
    if family in MERGEABLE:
        evaluator.evaluate([merging])
        changes = evaluator.merger.changes
        assert set(changes) == {(0, 1), (4, 5)}
        assert max(changes.values()) < 1e-5 < ALIGNMENT_TOLERANCE  # measured: about 3e-7 on each family
    else:  # a mixture of experts has no single MLP to permute
        with pytest.raises(MergeError, match=rf"not supported for {type(evaluator.model).__name__}: .*mixture of "
                                             r"experts.*pass --no-merge"):
            evaluator.evaluate([merging])
        assert evaluator.evaluate([[1, 0, 1, 1, 0, 1]])[0].nll < 20  # skip/keep still works


def test_a_layer_without_the_expected_projections_is_refused_by_name(llama_dir, text_file):
    merger = scorer(llama_dir, text_file).merger
    for layer in merger.layers[:2]:  # named as in a model with a fused gate_up_proj
        layer.mlp.gate_up_proj = layer.mlp.gate_proj
        del layer.mlp.gate_proj
    with pytest.raises(MergeError, match=r"LlamaForCausalLM: llama layers have no 'mlp.gate_proj.weight'.*--no-merge"):
        merger(Block(0, (1,)))


def test_a_family_entry_that_misreads_the_layer_is_caught_by_the_function_check(tiny_models, text_file, monkeypatch):
    """The registry is not trusted blindly: Gemma's norms declared as scaling by w (not 1 + w)
    fold the wrong scale, and the aligned layer's own function check refuses it."""
    monkeypatch.setitem(FAMILY_REGISTRY, "gemma2", dataclasses.replace(FAMILY_REGISTRY["gemma2"], norm_offset=0.0))
    evaluator = scorer(tiny_models["gemma2"], text_file)
    with pytest.raises(MergeError, match=r"Gemma2ForCausalLM: aligning layer 1 to layer 0 changed layer 1's own "
                                         r"function by .*--no-merge"):
        evaluator.evaluate([[1, 2, 1, 1, 1, 1]])


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_the_module_tree_tells_the_same_layout_as_the_registry(family, tiny_models):
    """A model type missing from the registry is read from its layers: on every registered family
    the reading agrees with the entry (norm places, 1 + w scaling, fused and q/k-normed projections, experts)."""
    model, _ = load_model(str(tiny_models[family]))
    registered = family_of(model)
    assert discover(model.model.layers[0], registered.name) == registered
