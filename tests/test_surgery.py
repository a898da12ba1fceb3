"""Layer surgery on every family: a temporary view and a compact model agree, and both are sound.

The table covers each gene: layers skipped and merged, and (for every family that can be cut in
width) a layer without attention, one without MLP, narrowed attention and a narrowed MLP, with
an attention-less first layer for the KV cache; repaired where the family supports repair.
"""
import pytest
import torch

from evaluators.config import EvaluatorConfig
from evaluators.export import load_pruned, save_compact
from evaluators.fitness import ModelEvaluator
from evaluators.surgery import layer_view
from tests.tiny import FAMILIES, MERGEABLE, REPAIRABLE, WIDTHS

SKIP_ONLY = [1, 0, 1, 1, 0, 1]
WITH_MERGE = [1, 2, 1, 0, 1, 2]
# tiny layers have 2 key-value groups and 64 channels: no attention first, then no MLP, narrowed
# attention, a narrowed MLP, no attention again, and a layer narrowed both ways
WITH_WIDTHS = [(0, 64), (2, 0), (1, 64), (2, 24), (0, 64), (1, 40)]
GENOMES = {"skip": SKIP_ONLY, "merge": WITH_MERGE, "widths": WITH_WIDTHS}
# Every family skips; merging, widths and repair are checked where they support the family
# (elsewhere they are refused: tests/test_merge.py, tests/test_repair.py, tests/test_widths.py).
CUTS = [(family, kind, repair) for family in FAMILIES for kind in GENOMES for repair in ("none", "lsq")
        if (family in MERGEABLE or kind != "merge") and (family in WIDTHS or kind != "widths")
        and (family in REPAIRABLE or repair == "none")]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def ids(seed=0, length=40):
    return torch.randint(3, 300, (2, length), generator=torch.Generator().manual_seed(seed))


def evaluator(folder, text_file, repair="lsq"):
    return ModelEvaluator(EvaluatorConfig(model=str(folder), data=str(text_file), seq_len=32,
                                          score_tokens=128, align_tokens=64, batch_size=2, repair=repair,
                                          repair_tokens=256, ranking_tokens=256))


@pytest.mark.parametrize("family", FAMILIES)
def test_view_changes_output_and_restores_the_model_exactly(family, tiny_models, text_file):
    scorer = evaluator(tiny_models[family], text_file, "none")
    model = scorer.model
    before = logits(model, ids())
    config_before = (model.config.num_hidden_layers, list(getattr(model.config, "layer_types", None) or []))
    layers = list(model.model.layers)
    stack = scorer.builder.raw_stack(SKIP_ONLY)
    with layer_view(model, stack.modules, stack.layer_types):
        assert model.config.num_hidden_layers == 4
        assert [m.self_attn.layer_idx for m in model.model.layers] == [0, 1, 2, 3]
        inside = logits(model, ids())
    assert not torch.allclose(inside, before, atol=1e-3)
    assert torch.equal(logits(model, ids()), before)
    assert (model.config.num_hidden_layers, list(getattr(model.config, "layer_types", None) or [])) == config_before
    assert [m.self_attn.layer_idx for m in model.model.layers] == list(range(6))
    assert list(model.model.layers) == layers


@pytest.mark.parametrize("family, kind, repair", CUTS, ids=[f"{f}-{k}-{r}" for f, k, r in CUTS])
def test_view_and_compact_model_agree_and_export_reloads_identically(family, kind, repair, tiny_models, text_file,
                                                                     tmp_path):
    scorer = evaluator(tiny_models[family], text_file, repair)
    genes = GENOMES[kind]
    stack = scorer.stack(genes)
    with layer_view(scorer.model, stack.modules, stack.layer_types):
        viewed = logits(scorer.model, ids())
    compact = scorer.builder.compact(genes)
    assert torch.equal(logits(compact, ids()), viewed)
    if family in ("qwen2", "gemma2", "gemma3"):  # the sliding-window type travels with its layer
        assert compact.config.layer_types == [scorer.builder.dense_types[b.anchor] for b in stack.plan]
        if hasattr(compact.model, "has_sliding_layers"):
            assert compact.model.has_sliding_layers == ("sliding_attention" in compact.config.layer_types)
    loads_with = save_compact(compact, tmp_path / "out")
    assert loads_with == ("gaprune" if kind == "widths" else "transformers")
    reloaded = load_pruned(tmp_path / "out", dtype=torch.float32)
    assert reloaded.config.num_hidden_layers == len(stack.plan)
    assert torch.equal(logits(reloaded, ids()), viewed)


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_with_kv_cache_matches_generation_without(family, tiny_models, text_file, tmp_path):
    scorer = evaluator(tiny_models[family], text_file, "lsq" if family in REPAIRABLE else "none")
    genes = WITH_WIDTHS if family in WIDTHS else WITH_MERGE if family in MERGEABLE else SKIP_ONLY
    save_compact(scorer.builder.compact(genes), tmp_path / "out")
    compact = load_pruned(tmp_path / "out")
    prompt = ids(seed=1, length=12)
    settings = dict(max_new_tokens=30, do_sample=False, pad_token_id=2)  # 42 tokens: past the sliding window
    cached = compact.generate(prompt, use_cache=True, **settings)
    uncached = compact.generate(prompt, use_cache=False, **settings)
    assert cached.shape[1] == 42
    assert torch.equal(cached, uncached)
