"""Widths on tiny models: units respect grouped-query attention, units that do nothing go without
changing the logits, the genome prices a cut model exactly, refits and sub-layer seams repair,
the one-shot global plan is a prefix of the ranking, and a width pick exports, reloads and heals
as it was scored."""
import argparse
import json
import random
import re
from pathlib import Path

import pytest
import torch

from chromosomes import ChromosomeError, ChromosomeRecord, from_string, to_string
from chromosomes.width import LayerUnits, Ranking, Unit, counts_left, reordered, select_global
from evaluators.config import DEV_TEXTS, EvaluatorConfig, REPORT_TEXTS
from evaluators.export import load_pruned
from evaluators.families import family_of
from evaluators.fitness import ModelEvaluator
from evaluators.surgery import install_layers, layer_view
from evaluators.units import NoAttention, full_geometry, layer_shape, narrowed, unit_importance
from experiments.search_quality import (HELDOUT_FIGURES, METHODS, SPEED_FIGURES, HeldOut, claim_work, ranking_taken,
                                        recorded_figures, row_config)
from experiments.report import RESULTS
from ga.checkpoint import RunFolder
from gaprune.files import write_json_atomic
from tests.tiny import FAMILIES, WIDTHS

IDS = torch.randint(0, 320, (4, 24), generator=torch.Generator().manual_seed(0))


def tiny(family: str, heads: int = 4, kv_heads: int = 2, layers: int = 3, seed: int = 0):
    config_class, model_class, extra = FAMILIES[family]
    config = config_class(vocab_size=320, num_hidden_layers=layers, hidden_size=48, intermediate_size=24,
                          num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=8,
                          max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                          tie_word_embeddings=False, **extra)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.15)
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def cut_to(model, units: list[Unit], removed: set[Unit]) -> None:
    """Every layer narrowed to the units a global selection leaves it (the ranking's prefixes)."""
    family, (geometry, channels) = family_of(model), full_geometry(model)
    ranking = Ranking.of(units, len(model.model.layers))
    layers = [narrowed(layer, ranking.kept(i, heads, width), family, geometry, channels)
              for i, (layer, (heads, width)) in enumerate(zip(model.model.layers, counts_left(units, removed, 3)))]
    install_layers(model, layers, None)


@pytest.mark.parametrize("family, heads, kv_heads", [
    ("llama", 8, 2),  # 4:1, as Llama-3-8B
    ("qwen2", 7, 1),  # 7:1, as Qwen2.5-7B (and q/k/v biases)
    ("mistral", 6, 2),  # 3:1, as SmolLM2
    ("llama", 4, 4),  # 1:1, no GQA
    ("qwen2", 14, 2),
])
@pytest.mark.parametrize("importance", ["taylor", "taylor2", "wanda"])
def test_the_query_to_key_value_ratio_stays_exact_in_every_layer(family, heads, kv_heads, importance):
    model = tiny(family, heads, kv_heads)
    units = unit_importance(model, IDS, importance)
    head = next(u for u in units if u.kind == "attention")
    assert head.cost == 2 * 48 * 8 * (heads // kv_heads) + 2 * 48 * 8 + (8 * (heads // kv_heads) + 16) * (family == "qwen2")
    decoder = sum(u.cost for u in units)
    cut_to(model, units, select_global(units, decoder // 3))
    for layer in model.model.layers:
        attention = layer.self_attn
        if isinstance(attention, NoAttention):  # a layer emptied by the selection: removed whole
            continue
        q, k, v = attention.q_proj.out_features, attention.k_proj.out_features, attention.v_proj.out_features
        assert q == (heads // kv_heads) * k and k == v and k % 8 == 0 and attention.o_proj.in_features == q
        if family == "qwen2":
            assert attention.q_proj.bias.numel() == q and attention.k_proj.bias.numel() == k
    assert torch.isfinite(logits(model)).all()


def zero_units(model, layer: int, kv_heads: list[int], channels: list[int]) -> None:
    """Make some units compute nothing: every weight they own set to zero."""
    geometry, _ = full_geometry(model)
    family = family_of(model)
    query, kv = geometry.group_size * geometry.head_dim, geometry.head_dim
    block = model.model.layers[layer]
    with torch.no_grad():
        for g in kv_heads:
            if family.qkv:
                weight = block.get_submodule(family.qkv).weight
                weight[g * query:(g + 1) * query] = 0
                weight[geometry.heads * kv + g * kv: geometry.heads * kv + (g + 1) * kv] = 0
                weight[(geometry.heads + geometry.kv_heads) * kv + g * kv:][:kv] = 0
            else:
                for path, size in ((family.q, query), (family.k, kv), (family.v, kv)):
                    block.get_submodule(path).weight[g * size:(g + 1) * size] = 0
            block.get_submodule(family.o).weight[:, g * query:(g + 1) * query] = 0
        for c in channels:
            if family.gate_up:
                weight = block.get_submodule(family.gate_up).weight
                weight[c] = 0
                weight[weight.shape[0] // 2 + c] = 0
            else:
                block.get_submodule(family.gate).weight[c] = 0
                block.get_submodule(family.up).weight[c] = 0
            block.get_submodule(family.down).weight[:, c] = 0


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "qwen3", "phi3", "gemma2", "granite"])
@pytest.mark.parametrize("importance", ["taylor", "taylor2", "wanda"])
def test_pruning_units_of_zero_importance_leaves_the_logits_unchanged(family, importance):
    model = tiny(family, heads=6, kv_heads=3)
    zero_units(model, 1, [0], [3, 7, 11])
    before = logits(model)
    units = unit_importance(model, IDS, importance)
    zeros = {(u.layer, u.kind, u.index) for u in units if u.importance == 0}
    assert zeros == {(1, "attention", 0), (1, "mlp", 3), (1, "mlp", 7), (1, "mlp", 11)}
    removed = select_global(units, sum(u.cost for u in units if u.importance == 0))
    assert {(u.layer, u.kind, u.index) for u in removed} == zeros  # nothing else was needed
    cut_to(model, units, removed)
    assert model.model.layers[1].mlp.down_proj.in_features == 21
    assert torch.allclose(logits(model), before, atol=1e-5)


@pytest.mark.parametrize("family", WIDTHS)
def test_the_genome_prices_a_cut_model_to_the_parameter(family, tiny_models, text_file):
    """Shape.kept(genes) is what the compact model holds: norms go with their sub-layer."""
    scorer = ModelEvaluator(EvaluatorConfig(model=str(tiny_models[family]), data=str(text_file), seq_len=32,
                                            score_tokens=128, batch_size=2, repair="none", ranking_tokens=256))
    shape = layer_shape(scorer.model)
    decoder = lambda model: sum(p.numel() for layer in model.model.layers for p in layer.parameters())
    assert shape.dense == decoder(scorer.model)
    genes = [(0, 64), 1, (2, 0), 0, (1, 40), (2, 8)]
    assert shape.kept(genes) == decoder(scorer.builder.compact(genes))


def random_units(seed: int, layers: int = 5) -> list[Unit]:
    rng = random.Random(seed)
    units = []
    for layer in range(layers):
        units += [Unit(layer, "attention", i, rng.random(), 40) for i in range(rng.randint(1, 4))]
        units += [Unit(layer, "mlp", i, rng.random() * 3, 7) for i in range(rng.randint(5, 30))]
    return units


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("share", [0.1, 0.25, 0.4, 0.7])
def test_the_knapsack_meets_the_budget_within_one_unit_and_keeps_prefixes_of_the_ranking(seed, share):
    units = random_units(seed)
    budget = int(share * sum(u.cost for u in units))
    removed = select_global(units, budget)
    spent = sum(u.cost for u in removed)
    assert budget <= spent < budget + max(u.cost for u in units)
    kept = [u for u in units if u not in removed]
    # everything removed is cheaper per parameter than everything kept, but for the last heads layers keep
    last_heads = {u for u in kept if u.kind == "attention"
                  and sum(k.kind == "attention" and k.layer == u.layer for k in kept) == 1}
    ratio = lambda u: u.importance / u.cost
    assert max(map(ratio, removed)) <= min(ratio(u) for u in kept if u not in last_heads)
    ranking = Ranking.of(units, 5)  # what a width genome of those counts keeps: the very same units
    for layer, (heads, channels) in enumerate(counts_left(units, removed, 5)):
        entry = ranking.kept(layer, heads, channels)
        assert set(entry.kv_heads) == {u.index for u in kept if u.layer == layer and u.kind == "attention"}
        assert set(entry.channels) == {u.index for u in kept if u.layer == layer and u.kind == "mlp"}


@pytest.mark.parametrize("seed", range(4))
def test_a_reordered_ranking_keeps_each_layers_share_of_a_global_plan_and_follows_the_order(seed):
    units = random_units(seed)
    rng = random.Random(seed)
    orders = {}
    for unit in units:
        orders.setdefault((unit.layer, unit.kind), []).append(unit.index)
    for order in orders.values():
        rng.shuffle(order)
    moved = reordered(units, orders)
    budget = int(0.4 * sum(u.cost for u in units))
    assert counts_left(moved, select_global(moved, budget), 5) == counts_left(units, select_global(units, budget), 5)
    ranking = Ranking.of(moved, 5)
    for (layer, kind), order in orders.items():
        assert (ranking.kv_heads if kind == "attention" else ranking.channels)[layer] == tuple(order)
    with pytest.raises(ChromosomeError, match="layer 0's mlp units is not a permutation"):
        reordered(units, {(0, "mlp"): [0, 0]})


def test_a_plan_is_validated_like_a_chromosome():
    with pytest.raises(ChromosomeError, match="units lists 1 layers but the genes keep 2"):
        ChromosomeRecord((1, 0, 1), "m", 3, units=(LayerUnits((0,), (1,)),))
    with pytest.raises(ChromosomeError, match="ascending, distinct"):
        ChromosomeRecord.from_dict({"format": "gaprune.chromosome", "format_version": 1, "genes": [1], "model": "m",
                                    "num_layers": 1, "units": [{"kv_heads": [1, 0], "channels": []}]})
    with pytest.raises(ChromosomeError, match="keeps 1 key-value heads and 1 channels, but the gene of layer 0"):
        ChromosomeRecord(((2, 1), 0), "m", 2, units=(LayerUnits((0,), (1,)),))
    with pytest.raises(ChromosomeError, match="units\\[0\\] keeps nothing"):
        ChromosomeRecord((1, 0), "m", 2, units=(LayerUnits((), ()),))


# -- repairs of sub-layer cuts -----------------------------------------------------------------------

def evaluator(llama_dir, text_file, **overrides):
    settings = dict(model=str(llama_dir), data=str(text_file), seq_len=32, score_tokens=128, batch_size=2,
                    align_tokens=64, repair_tokens=256, ranking_tokens=256)
    return ModelEvaluator(EvaluatorConfig(**{**settings, **overrides}))


def sublayer_error(scorer, stack, position: int, kind: str, reference) -> float:
    """Squared distance of a sub-layer's output from `reference` on the repair windows."""
    outputs = []
    module = stack.modules[position].get_submodule("self_attn" if kind == "attention" else "mlp")
    hook = module.register_forward_hook(lambda _m, _a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
    repairer = scorer.builder.repairer
    with layer_view(scorer.model, stack.modules, stack.layer_types), torch.no_grad():
        for batch in repairer._batches():
            scorer.model.model(input_ids=batch, use_cache=False)
    hook.remove()
    return sum(float((o - r).pow(2).sum()) for o, r in zip(outputs, reference(repairer)))


@pytest.mark.parametrize("kind, gene", [("mlp", (2, 24)), ("attention", (1, 64))])
def test_a_refitted_sub_layer_reproduces_the_dense_output_better_than_the_cut_one(llama_dir, text_file, kind, gene):
    genes = [1, 1, gene, 1, 1, 1]
    refit, cut = evaluator(llama_dir, text_file), evaluator(llama_dir, text_file, refit=False)
    dense = evaluator(llama_dir, text_file).stack([1] * 6)

    def dense_output(repairer):
        outputs = []
        module = dense.modules[2].get_submodule("self_attn" if kind == "attention" else "mlp")
        hook = module.register_forward_hook(lambda _m, _a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
        with layer_view(refit.model, dense.modules, dense.layer_types), torch.no_grad():
            for batch in repairer._batches():
                refit.model.model(input_ids=batch, use_cache=False)
        hook.remove()
        return outputs

    errors = [sublayer_error(scorer, scorer.stack(genes), 2, kind, dense_output) for scorer in (cut, refit)]
    assert errors[1] < 0.9 * errors[0], errors


def test_refitting_an_uncut_model_on_its_own_states_gives_back_its_weights(llama_dir, text_file):
    """refit_on_cut's least squares, on a model nothing was cut from, has the dense weights as
    its exact solution: the inputs, targets and streams it reads line up."""
    scorer = evaluator(llama_dir, text_file, repair_ridge=0.0)
    stack = scorer.stack([1] * 6)
    refitted = scorer.builder.repairer.refit_on_cut(stack, whole_layers=True)
    for before, after in zip(stack.modules, refitted.modules):
        assert after is not before  # copied, so the builder's cached modules stay as they were
        for path in ("self_attn.o_proj", "mlp.down_proj"):
            dense, fitted = before.get_submodule(path).weight, after.get_submodule(path).weight
            assert torch.allclose(fitted, dense, atol=1e-3 * float(dense.abs().max())), path


@pytest.mark.parametrize("genes", [[1, [1, 24], 0, [2, 16], 1, 1], [1, [0, 24], [2, 0], 1, 0, [1, 40]]])
def test_a_refit_on_the_cut_model_brings_its_last_state_nearer_the_dense_one(llama_dir, text_file, genes):
    """Each narrowed projection refitted on what the cut model feeds it, to the dense stream past
    any seam, undoes more of the error that reaches the model's last layer than refits on dense
    inputs do (removed sub-layers and skipped layers on the way)."""
    scorer = evaluator(llama_dir, text_file)
    repairer = scorer.builder.repairer
    stack = scorer.stack(genes)

    def last_state_error(modules) -> float:
        states = []
        hook = modules[-1].register_forward_hook(lambda _m, _a, out: states.append(out[0] if isinstance(out, tuple) else out))
        with layer_view(scorer.model, modules, stack.layer_types), torch.no_grad():
            for batch in repairer._batches():
                scorer.model.model(input_ids=batch, use_cache=False)
        hook.remove()
        return sum(float((s - d).pow(2).sum()) for s, d in zip(states, repairer.dense_states()[-1]))

    assert last_state_error(repairer.refit_on_cut(stack).modules) < last_state_error(stack.modules)


def test_the_ranking_is_computed_once_per_run_folder_and_read_back(llama_dir, text_file, tmp_path):
    first = evaluator(llama_dir, text_file, align_cache=str(tmp_path))
    units = first.units()
    assert len(list(tmp_path.glob("units-*.json"))) == 1
    second = evaluator(llama_dir, text_file, align_cache=str(tmp_path))
    import evaluators.build as build
    original, build.unit_importance = build.unit_importance, lambda *_: pytest.fail("ranked again")
    try:
        assert second.units() == units
    finally:
        build.unit_importance = original
    other = evaluator(llama_dir, text_file, align_cache=str(tmp_path), ranking="taylor")
    assert other.units() != units and len(list(tmp_path.glob("units-*.json"))) == 2


def test_the_obs_ranking_orders_each_layer_as_its_refit_loses_least_with_taylor2s_allocation(llama_dir, text_file,
                                                                                             tmp_path):
    taylor2 = evaluator(llama_dir, text_file, ranking="taylor2").units()
    obs = evaluator(llama_dir, text_file, ranking="obs", align_cache=str(tmp_path))
    units = obs.units()
    repairer, geometry = obs.builder.repairer, full_geometry(obs.model)[0]
    ranking = Ranking.of(units, 6)
    for layer in range(6):
        assert list(ranking.channels[layer]) == repairer.removal_order(layer, "mlp", 1)
        assert list(ranking.kv_heads[layer]) == repairer.removal_order(layer, "attention",
                                                                         geometry.group_size * geometry.head_dim)
    budget = int(0.3 * sum(u.cost for u in units))
    assert counts_left(units, select_global(units, budget), 6) == counts_left(taylor2, select_global(taylor2, budget), 6)
    assert Ranking.of(taylor2, 6) != ranking  # the order, not the allocation, is what changed
    assert evaluator(llama_dir, text_file, align_cache=str(tmp_path)).units() == units  # auto: obs, its store file
    again = evaluator(llama_dir, text_file, ranking="obs", align_cache=str(tmp_path), repair_tokens=128)
    assert len(list(tmp_path.glob("units-*.json"))) == 1 and again.units() != units  # the refit's statistics count
    assert len(list(tmp_path.glob("units-*.json"))) == 2


@pytest.mark.parametrize("method, theirs, ours, reused", [
    ("ga-joint", {}, {"ranking": "taylor2"}, False),
    ("ga-joint", {"ranking": "obs"}, {}, True),
    ("evopress-joint", {"ranking": "taylor2"}, {"ranking": "wanda"}, False),
    ("width-oneshot-raw", {"ranking": "taylor2"}, {"ranking": "obs"}, True),  # no refit: cut by taylor2 either way
    ("ga-sublayers", {"ranking": "taylor2"}, {"ranking": "obs"}, True),  # seeded by the widths, which obs keeps
    ("ga-sublayers", {"ranking": "taylor2"}, {"ranking": "wanda"}, False),
    ("ga-importance", {"ranking": "taylor"}, {"ranking": "obs"}, True),
    ("width-oneshot", {"ranking": "taylor2"}, {"ranking": "taylor2", "refit": False}, False),
    ("ga-sublayers", {"ranking_tokens": 8192}, {"ranking_tokens": 4096}, False),
])
def test_the_benchmark_reuses_a_run_only_where_the_ranking_it_took_is_the_same(method, theirs, ours, reused):
    repair = "none" if method == "width-oneshot-raw" else "lsq"
    taken = [ranking_taken(method, row_config(EvaluatorConfig(**settings), repair)) for settings in (theirs, ours)]
    assert (taken[0] == taken[1]) == reused


@pytest.mark.parametrize("cached", [False, True])
def test_a_reused_run_keeps_its_held_out_figures_and_only_speed_is_measured_again(tmp_path, cached):
    """A run brought in by --reuse has no held-out cache under the new work folder: its own file's
    figures stand, so neither a quarter of an hour per pick nor --speed-again re-measures them."""
    row = json.loads((RESULTS / "search_quality-obs.json").read_text())["rows"][0]
    if cached:
        write_json_atomic(tmp_path / "heldout" / f"{row['chromosome']}-lsq.json", recorded_figures(row))
    heldout = HeldOut.__new__(HeldOut)
    heldout.work, heldout.test, heldout.dev = tmp_path, dict.fromkeys(REPORT_TEXTS), dict.fromkeys(DEV_TEXTS)
    heldout.args = argparse.Namespace(speed_again=False, fitness="ppl")
    heldout.evaluators = lambda *_: pytest.fail("measured again")
    measured = heldout.measure(from_string(row["chromosome"]), "lsq", {} if cached else row)
    assert measured == {name: row[name] for name in (*HELDOUT_FIGURES, *SPEED_FIGURES)}


def test_the_benchmark_times_a_genome_against_the_dense_model_in_every_phase(llama_dir, text_file):
    from experiments.search_quality import speed
    scored = evaluator(llama_dir, text_file)
    prompt = torch.randint(0, 320, (1, 16))
    measured = speed(scored, [1, 0, 1, 1, 1, 1], prompt)
    assert list(measured) == list(SPEED_FIGURES) and all(value > 0 for value in measured.values())


@pytest.mark.parametrize("method, takes", [
    ("ga-joint", "order"), ("ga-joint-4of16-t3", "order"), ("evopress-joint", "order"), ("width-oneshot", "order"),
    ("width-oneshot-raw", "order"), ("depth-then-width", "order"),
    ("ga-sublayers", "allocation"),  # seeded by the one-shot plan's widths, cuts no unit itself
    ("ga-sublayers-importance", None), ("ga-importance", None), ("evopress-importance", None), ("shortgpt-bi", None),
])
def test_each_benchmark_method_says_what_it_takes_from_the_ranking(method, takes):
    assert METHODS[method].takes == takes


@pytest.mark.parametrize("first, then, refused", [
    ({}, {}, None),
    ({"ranking": "obs"}, {}, None),  # auto resolves to obs where narrowed layers are refitted
    ({}, {"threads": 2, "data_dir": "elsewhere"}, None),  # a run resumes with these changed
    ({"ranking": "taylor2"}, {}, "ranking taylor2 there, obs here"),
    ({}, {"repair": "none"}, "ranking obs there, taylor2 here, repair"),
    ({"fitness": "ppl"}, {"fitness": "kl"}, "fitness"),
    ({}, {"ranking_tokens": 4096}, "ranking_tokens"),
])
def test_a_benchmark_work_folder_refuses_a_start_measured_another_way(tmp_path, first, then, refused):
    claim_work(tmp_path, EvaluatorConfig(**first))
    saved = (tmp_path / "evaluator.json").read_text()
    if refused is None:
        claim_work(tmp_path, EvaluatorConfig(**then))
    else:
        with pytest.raises(SystemExit, match=re.escape(refused)):
            claim_work(tmp_path, EvaluatorConfig(**then))
    assert (tmp_path / "evaluator.json").read_text() == saved  # the first start's settings stay


# -- the search's one-shot plan, exported and healed -----------------------------------------------------

def search(llama_dir, text_file, out, *extra):
    from ga.run import main
    return main(["--model", str(llama_dir), "--data", str(text_file), "--out", str(out), "--seq-len", "32",
                 "--score-tokens", "256", "--screen-tokens", "64", "--ranking-tokens", "256", "--repair-tokens", "256",
                 "--align-tokens", "64", "--batch-size", "4", "--workers", "local", "--no-progress", *extra])


def heal(best, out, text_file, held_out, *extra):
    from finetune.best import main
    return main(["--chromosome", str(best), "--out", str(out), "--data", str(text_file), "--eval-texts",
                 str(held_out), "--seq-len", "32", "--eval-seq-len", "32", "--eval-tokens", "512", "--batch-size", "4",
                 "--warmup", "1", "--no-efficiency", "--no-progress", *extra])


def run_readme_loading_snippet(folder):
    """The README's loading lines, as a user pastes them, on this export."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert '"compact"' in code and len(code.splitlines()) <= 5
    exec(code.replace('"compact"', repr(str(folder))), {})


def test_the_one_shot_width_plan_is_scored_exported_reloaded_and_healed_as_it_was_measured(
        llama_dir, text_file, held_out, tmp_path):
    assert search(llama_dir, text_file, tmp_path / "oneshot", "--init", "width", "--gens", "0",
                  "--params", "0.3") == 0
    run = tmp_path / "oneshot"
    record = ChromosomeRecord.load(run / "best.json")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["evaluations"] == 1 and 0.3 <= summary["decoder_parameters"]["removed_share"] < 0.33
    assert record.units is not None and any(isinstance(gene, tuple) for gene in record.genes)
    assert heal(run / "best.json", tmp_path / "model", text_file, held_out, "--steps", "0", "--measure") == 0
    report = json.loads((tmp_path / "model" / "report.json").read_text())
    assert report["loads_with"] == "gaprune"
    model = load_pruned(tmp_path / "model")
    own = load_pruned(run / "compact")  # what the search wrote at its end, from its own statistics
    assert torch.allclose(logits(own), logits(model), atol=1e-6)
    assert ChromosomeRecord.load(run / "compact" / "chromosome.json").genes == record.genes
    run_readme_loading_snippet(tmp_path / "model")
    scorer = ModelEvaluator(EvaluatorConfig.from_dict(record.extra["evaluator"]))
    stack = scorer.builder.stack(record.genes, record.units)
    with layer_view(scorer.model, stack.modules, stack.layer_types):
        viewed = logits(scorer.model)
    assert torch.allclose(logits(model), viewed, atol=1e-5)  # the export is the model the search scored
    from evaluators.perplexity import perplexity
    from evaluators.text import text_blocks
    measured = perplexity(model, text_blocks(str(held_out), scorer.tokenizer, 32, 512), 4)[0]
    assert measured == pytest.approx(report["before"][str(held_out)]["perplexity"], rel=1e-5)
    assert heal(run / "best.json", tmp_path / "healed", text_file, held_out, "--steps", "6", "--plan", "wide") == 0
    healed = json.loads((tmp_path / "healed" / "report.json").read_text())
    assert healed["after"][str(held_out)]["perplexity"] < report["before"][str(held_out)]["perplexity"]


def test_a_joint_search_keeps_its_budget_and_beats_its_seed(llama_dir, text_file, tmp_path):
    assert search(llama_dir, text_file, tmp_path / "joint", "--gens", "3", "--pop", "6",
                  "--params", "0.25", "--patience", "0") == 0
    run = tmp_path / "joint"
    checkpoint = json.loads((run / "checkpoint.json").read_text())
    budget = checkpoint["removed"]
    assert budget["space"] == "joint" and budget["remove"] > 0
    shape = __import__("chromosomes").Shape.from_dict(checkpoint["definition"]["widths"]["shape"])
    from chromosomes import from_string
    for line in (run / "evaluations.jsonl").read_text().splitlines():
        genes = from_string(json.loads(line)["key"])
        assert budget["remove"] <= shape.removed(genes) < budget["remove"] + budget["slack"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["fitness"]["best"]["perplexity"] <= summary["fitness"]["seed"]["perplexity"]
    assert len(summary["architecture"]) == 6 and all("kv_heads" in e or e["gene"] in "02" for e in summary["architecture"])


@pytest.mark.parametrize("screen_tokens", ["64", "0"])
def test_the_sublayer_seed_measures_each_sub_layer_removed_alone_and_keeps_the_budget(
        llama_dir, text_file, tmp_path, screen_tokens):
    assert search(llama_dir, text_file, tmp_path / "sub", "--space", "sublayers", "--gens", "0", "--params", "0.3",
                  "--screen-tokens", screen_tokens) == 0
    run = tmp_path / "sub"
    checkpoint = json.loads((run / "checkpoint.json").read_text())
    assert checkpoint["search"]["init"] == "sublayers"  # the default of this space
    state, budget = checkpoint["state"], checkpoint["removed"]
    scans = 1 + 2 * checkpoint["definition"]["num_layers"]  # the dense model and each sub-layer removed alone
    if screen_tokens == "0":  # scored in full, then the seed
        assert state["screenings"] == 0 and state["evaluations"] == scans + 1
    else:
        assert state["screenings"] == scans and state["evaluations"] == 1
    assert list(RunFolder(run).scored()) == [to_string(ChromosomeRecord.load(run / "best.json").genes)]  # the scans left out
    shape = __import__("chromosomes").Shape.from_dict(checkpoint["definition"]["widths"]["shape"])
    genes = ChromosomeRecord.load(run / "best.json").genes
    assert budget["remove"] <= shape.removed(genes) < budget["remove"] + budget["slack"]
    assert all(shape.counts(gene) in {(0, 0), (shape.kv_heads, 0), (0, shape.channels), (shape.kv_heads, shape.channels)}
               for gene in genes)


@pytest.mark.parametrize("extra, message", [
    (["--params", "1.5"], "params must be a share between 0 and 1 or a whole count"),
    (["--space", "joint", "--remove", "2"], "--remove and --ratio count whole layers"),
    (["--space", "layers", "--init", "width"], "--init width cuts sub-layers"),
    (["--space", "layers", "--init", "sublayers"], "--init sublayers cuts sub-layers"),
    (["--init", "random", "--gens", "0"], "--gens 0 scores the one-shot seed alone"),
    (["--ranking", "magnitude"], "ranking must be one of taylor, taylor2, wanda"),
    (["--mlp-levels", "0"], "mlp_levels must be a positive integer"),
])
def test_bad_width_settings_are_refused_with_a_clear_message(llama_dir, text_file, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_:
        search(llama_dir, text_file, tmp_path / "bad", *extra)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_mixture_of_experts_is_refused_widths_by_name(tiny_models, text_file, tmp_path, capsys):
    with pytest.raises(SystemExit):
        search(tiny_models["mixtral"], text_file, tmp_path / "moe", "--space", "sublayers")
    assert "mixture of experts" in capsys.readouterr().err and not (tmp_path / "moe").exists()


@pytest.mark.parametrize("kept", ["model.embed_tokens.weight", "lm_head.weight"])
def test_a_tied_export_loads_under_whichever_name_its_shared_matrix_was_saved(kept, tmp_path):
    """safetensors keeps one name of a shared tensor; an actor's export kept lm_head's."""
    from safetensors.torch import load_file, save_file

    from evaluators.config import EvaluatorConfig
    from evaluators.fitness import ModelEvaluator
    from tests.tiny import build_model, grammar_text
    model = build_model("llama", tmp_path / "dense")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tmp_path / "dense")
    (tmp_path / "text.txt").write_text(grammar_text(400, seed=3))
    scorer = ModelEvaluator(EvaluatorConfig(model=str(tmp_path / "dense"), data=str(tmp_path / "text.txt"),
                                            seq_len=32, score_tokens=64, ranking_tokens=64, repair="none"))
    scorer.export([1, (1, 32), 1, (2, 64), 1, 1], str(tmp_path / "cut"), {})
    saved = load_file(str(tmp_path / "cut" / "model.safetensors"))
    matrix = saved.pop("model.embed_tokens.weight", None)
    matrix = saved.pop("lm_head.weight", matrix)
    save_file({**saved, kept: matrix}, str(tmp_path / "cut" / "model.safetensors"), metadata={"format": "pt"})
    loaded = load_pruned(tmp_path / "cut")
    assert torch.equal(loaded.get_input_embeddings().weight, matrix)
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight


def test_collecting_a_benchmark_with_no_finished_run_says_so_and_writes_nothing(tmp_path):
    from experiments.search_quality import main
    with pytest.raises(SystemExit, match="no run under .* has its held-out figures yet"):
        main(["--collect", "--work", str(tmp_path / "work"), "--output", "never-written"])
    assert not (RESULTS / "never-written.json").exists()


def test_a_benchmark_takes_only_the_config_fields_it_names_with_their_defaults():
    from gaprune.options import add_config_arguments
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, EvaluatorConfig, "where to run", only=("device", "dtype"))
    assert vars(parser.parse_args(["--dtype", "float32"])) == {"device": "auto", "dtype": "float32"}
