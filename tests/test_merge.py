"""Merge with rotation: alignment is function-preserving, and fusing follows the rule."""
import dataclasses
from functools import partial

import pytest
import torch

from chromosomes import Block
from evaluators.config import EvaluatorConfig
from evaluators.alignment import (
    Alignment, AlignmentCache, Moments, auto_align_tokens, compute_alignment, greedy, group_cross, hungarian,
    improve_by_swaps, pair_statistics, resolved_assignment,
)
from evaluators.families import FAMILIES as FAMILY_REGISTRY, Geometry, discover, family_of
from evaluators.fitness import ModelEvaluator
from evaluators.merge import (
    ALIGNMENT_TOLERANCE, LayerMerger, MergeError, apply_alignment, build_layer, combine, folded_params,
    record_layer_inputs,
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
    """The model and its pair statistics (what LayerMerger gets), streamed on 128 tokens."""
    model, tokenizer = load_model(str(tiny_models[request.param]))
    blocks = text_blocks(str(text_file), tokenizer, 32, max_tokens=128)
    family, geometry = family_of(model), Geometry.of(model.config)
    return model, partial(pair_statistics, model, list(model.model.layers), family, geometry, blocks, 2)


def test_alignment_alone_leaves_each_layer_output_unchanged(dense):
    model, statistics = dense
    geometry, family = Geometry.of(model.config), family_of(model)
    probes = record_layer_inputs(model, list(model.model.layers), torch.arange(24)[None] % model.config.vocab_size)
    for anchor, other in [(0, 1), (2, 4), (5, 3)]:
        alignment = compute_alignment(*statistics(anchor, other))
        assert not torch.equal(alignment.mlp_order, torch.arange(alignment.mlp_order.numel()))  # it does permute
        layer = model.model.layers[other]
        aligned = build_layer(layer, apply_alignment(folded_params(layer, family, geometry), alignment, geometry), family)
        before, after = layer_output(layer, probes[other]), layer_output(aligned, probes[other])
        assert torch.allclose(before, after, atol=1e-5, rtol=1e-5), (before - after).abs().max()


def layer_activations(model, layer, family, blocks):
    """One layer's MLP units and head outputs on `blocks`, kept whole (what streaming avoids)."""
    seen = {"mlp": [], "heads": []}
    hooks = [family.module(layer, path).register_forward_pre_hook(
        lambda _m, args, key=key: seen[key].append(args[0].reshape(-1, args[0].shape[-1])))
        for key, path in (("mlp", family.down), ("heads", family.o))]
    with torch.no_grad():
        model.model(input_ids=blocks, use_cache=False)
    for hook in hooks:
        hook.remove()
    return torch.cat(seen["mlp"]), torch.cat(seen["heads"])


def test_alignment_recovers_a_scrambled_copy_of_the_anchor(tiny_models, text_file):
    """A permuted and rotated copy of a layer must be mapped back exactly onto it."""
    model, tokenizer = load_model(str(tiny_models["llama"]))
    geometry, family = Geometry.of(model.config), family_of(model)
    mlp, heads = layer_activations(model, model.model.layers[2], family,
                                   text_blocks(str(text_file), tokenizer, 32, max_tokens=128))
    anchor = folded_params(model.model.layers[2], family, geometry)
    scramble = Alignment(torch.randperm(64, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 0]),
                         torch.linalg.qr(torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(2)))[0])
    copy = apply_alignment(anchor, scramble, geometry)
    # the copy's activations: units in the scrambled order, head groups swapped and rotated
    copy_heads = torch.einsum("thgk,gkj->thgj", heads.view(-1, 2, 2, 8)[:, scramble.group_order.tolist()]
                              .permute(0, 2, 1, 3), scramble.rotations).permute(0, 2, 1, 3).reshape(heads.shape)
    moments = Moments()
    for rows in torch.arange(mlp.shape[0]).split(48):  # streamed in batches, as pair_statistics does
        moments.add(mlp[rows], mlp[rows][:, scramble.mlp_order])
    recovered = apply_alignment(copy, compute_alignment(moments, group_cross(heads, copy_heads, geometry)), geometry)
    for name, value in anchor.items():
        assert torch.allclose(recovered[name], value, atol=1e-4), name


def test_streamed_moments_give_the_correlation_of_all_tokens_at_once():
    """Far from zero (a mean of 1,000 against a spread of 1), the shifted fp32 sums still give the
    correlation an fp64 computation on all tokens gives."""
    generator = torch.Generator().manual_seed(0)
    a = 1000 + torch.randn(600, 12, generator=generator)
    b = a[:, :10] * 0.5 + torch.randn(600, 10, generator=generator) - 300
    moments = Moments()
    for rows in torch.arange(600).split(128):
        moments.add(a[rows], b[rows])
    exact = torch.corrcoef(torch.cat([a, b], 1).double().T)[:12, 12:]
    assert moments.tokens == 600
    assert torch.allclose(moments.correlation().double(), exact, atol=2e-5)


@pytest.mark.parametrize("noise, share", [(0.5, 1.0), (3.0, 1.0), (100.0, 0.97)])
def test_greedy_matching_is_near_the_hungarian_optimum(noise, share):
    """Planted correspondences (units of b are noisy, shuffled units of a) are found exactly by
    both; on pure noise the greedy matching keeps at least `share` of the optimal total."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(600, 300, generator=generator)
    planted = torch.randperm(300, generator=generator)
    b = a[:, planted] + noise * torch.randn(600, 300, generator=generator)
    moments = Moments()
    moments.add(a, b)
    similarity = moments.correlation()
    exact, fast = hungarian(similarity), greedy(similarity)
    total = lambda order: float(similarity[torch.arange(300), order].sum())  # noqa: E731
    assert sorted(fast.tolist()) == list(range(300))  # a permutation
    assert total(fast) >= share * total(exact) and total(fast) <= total(exact) + 1e-4
    if share == 1.0:
        assert torch.equal(exact, planted.argsort()) and torch.equal(fast, exact)


def test_swaps_never_lower_the_total():
    similarity = torch.randn(50, 50, generator=torch.Generator().manual_seed(3))
    start = torch.randperm(50, generator=torch.Generator().manual_seed(4))
    total = lambda order: float(similarity[torch.arange(50), order].sum())  # noqa: E731
    improved = improve_by_swaps(similarity, start.clone())
    assert sorted(improved.tolist()) == list(range(50)) and total(improved) > total(start)


@pytest.mark.parametrize("method, units, device, used", [
    ("auto", 1536, "cpu", "hungarian"), ("auto", 14336, "cpu", "hungarian"), ("auto", 4096, "cuda", "hungarian"),
    ("auto", 14336, "cuda", "greedy"), ("greedy", 64, "cpu", "greedy"), ("hungarian", 14336, "cuda", "hungarian"),
])
def test_auto_matches_greedily_only_on_a_gpu_above_4096_units(method, units, device, used):
    assert resolved_assignment(method, units, torch.device(device)) == used


@pytest.mark.parametrize("units, seq_len, tokens", [(64, 32, 2048), (1536, 1024, 2048), (14336, 1024, 14336),
                                                    (14336, 4096, 16384), (3000, 1000, 3000)])
def test_alignment_tokens_cover_the_units_in_whole_windows(units, seq_len, tokens):
    assert auto_align_tokens(units, seq_len) == tokens


def test_combine_rules():
    anchor = {"w": torch.tensor([1.0, 2.0])}
    others = [{"w": torch.tensor([3.0, 2.0])}, {"w": torch.tensor([2.0, 5.0])}]
    assert torch.equal(combine(anchor, others, "mean")["w"], torch.tensor([2.0, 3.0]))
    assert torch.equal(combine(anchor, others, "sum")["w"], torch.tensor([4.0, 5.0]))
    with pytest.raises(ValueError, match="unknown merge rule"):
        combine(anchor, others, "max")


def test_merger_caches_fused_layers_within_its_bytes_and_leaves_dense_layers_untouched(dense):
    model, statistics = dense
    layers = list(model.model.layers)
    originals = {name: p.clone() for name, p in model.named_parameters()}
    layer_bytes = sum(p.numel() * p.element_size() for p in layers[0].parameters())
    merger = LayerMerger(layers, statistics, Geometry.of(model.config), family_of(model), "mean",
                         cache_bytes=int(2.5 * layer_bytes))  # room for two fused layers
    first = merger(Block(1, (2, 3)))
    assert merger(Block(1, (2, 3))) is first
    merger(Block(0, (1,)))
    merger(Block(4, (5,)))  # evicts the oldest
    assert merger(Block(1, (2, 3))) is not first
    assert all(torch.equal(p, originals[name]) for name, p in model.named_parameters())
    assert first not in layers and not any(p.requires_grad for p in first.parameters())


def scorer(folder, text_file, **settings):
    return ModelEvaluator(EvaluatorConfig(**{"model": str(folder), "data": str(text_file), "seq_len": 32,
                                             "score_tokens": 128, "align_tokens": 64, "batch_size": 2,
                                             "repair_tokens": 256, "repair": "none", **settings}))


def test_alignments_on_disk_serve_another_evaluator_without_statistics(llama_dir, text_file, tmp_path):
    first = scorer(llama_dir, text_file, align_cache=str(tmp_path / "alignments"))
    merged = first.evaluate([[1, 2, 2, 1, 0, 1]])
    assert len(list((tmp_path / "alignments").glob("*.safetensors"))) == 2  # (0, 1) and (0, 2)
    second = scorer(llama_dir, text_file, align_cache=str(tmp_path / "alignments"))
    second.builder.merger.statistics = lambda *pair: pytest.fail(f"statistics of {pair} recomputed")
    assert [f.nll for f in second.evaluate([[1, 2, 2, 1, 0, 1]])] == [f.nll for f in merged]
    other = scorer(llama_dir, text_file, align_cache=str(tmp_path / "alignments"), align_tokens=96)
    assert AlignmentCache(tmp_path / "alignments", {}).digest != other.builder.merger.store.digest
    assert other.builder.merger.store.digest != second.builder.merger.store.digest  # other tokens: other alignments


@pytest.mark.parametrize("method, recorded", [("auto", None), ("hungarian", None), ("greedy", "greedy")])
def test_the_assignment_is_recorded_where_it_is_not_the_hungarian_method(llama_dir, text_file, method, recorded):
    evaluator = scorer(llama_dir, text_file, align_method=method)
    assert evaluator.describe()["merge"].get("assignment") == recorded
    assert evaluator.evaluate([[1, 2, 1, 1, 0, 1]])[0].nll < 20


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_aligned_layer_is_checked_and_a_mixture_of_experts_is_refused(family, tiny_models, text_file):
    evaluator = scorer(tiny_models[family], text_file)
    merging = [1, 2, 1, 0, 1, 2]
    if family in MERGEABLE:
        evaluator.evaluate([merging])
        changes = evaluator.builder.merger.changes
        assert set(changes) == {(0, 1), (4, 5)}
        assert max(changes.values()) < 1e-5 < ALIGNMENT_TOLERANCE  # measured: about 3e-7 on each family
    else:  # a mixture of experts has no single MLP to permute
        with pytest.raises(MergeError, match=rf"not supported for {type(evaluator.model).__name__}: .*mixture of "
                                             r"experts.*pass --no-merge"):
            evaluator.evaluate([merging])
        assert evaluator.evaluate([[1, 0, 1, 1, 0, 1]])[0].nll < 20  # skip/keep still works


def test_a_layer_without_the_expected_projections_is_refused_by_name(llama_dir, text_file):
    merger = scorer(llama_dir, text_file).builder.merger
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
