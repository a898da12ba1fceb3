"""Width pruning on tiny models: units respect grouped-query attention, units that do nothing go
without changing the logits, emptied layers are removed, exports reload identically, and the
selection meets its parameter budget."""
import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from chromosomes import ChromosomeError, ChromosomeRecord
from chromosomes.width import LayerUnits, Unit, kept_units, select_global, select_uniform, without_empty_layers
from evaluators.families import family_of
from evaluators.width import (
    EmptyMLP, WidthError, full_geometry, load_width_pruned, prune_width, save_pruned, unit_importance,
)
from tests.tiny import FAMILIES

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
    units = unit_importance(model, IDS, 2, importance)
    head = next(u for u in units if u.kind == "attention")
    assert head.cost == 2 * 48 * 8 * (heads // kv_heads) + 2 * 48 * 8 + (8 * (heads // kv_heads) + 16) * (family == "qwen2")
    decoder = sum(u.cost for u in units)
    removed = select_global(units, decoder // 3)
    prune_width(model, kept_units(units, removed, 3))
    for layer in model.model.layers:
        attention = layer.self_attn
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
    units = unit_importance(model, IDS, 2, importance)
    zeros = {(u.layer, u.kind, u.index) for u in units if u.importance == 0}
    assert zeros == {(1, "attention", 0), (1, "mlp", 3), (1, "mlp", 7), (1, "mlp", 11)}
    removed = select_global(units, sum(u.cost for u in units if u.importance == 0))
    assert {(u.layer, u.kind, u.index) for u in removed} == zeros  # nothing else was needed
    prune_width(model, kept_units(units, removed, 3))
    assert model.model.layers[1].mlp.down_proj.in_features == 21
    assert torch.allclose(logits(model), before, atol=1e-5)


def test_a_layer_emptied_by_selection_is_removed_and_the_model_still_runs():
    model = tiny("llama", layers=4)
    zero_units(model, 2, [0, 1], list(range(24)))  # layer 2 does nothing at all
    before = logits(model)
    units = unit_importance(model, IDS, 2, "taylor")
    removed = select_global(units, sum(u.cost for u in units if u.layer == 2))
    keep = kept_units(units, removed, 4)
    assert keep[2].empty and not any(k.empty for i, k in enumerate(keep) if i != 2)
    genes, left = without_empty_layers((1, 1, 1, 1), keep)
    assert genes == (1, 1, 0, 1) and len(left) == 3
    ChromosomeRecord(genes, "m", 4, units=left)  # a valid plan
    prune_width(model, keep)
    assert len(model.model.layers) == 3 and model.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    assert torch.allclose(logits(model), before, atol=1e-5)


def test_a_layer_keeps_its_last_head_while_it_has_an_mlp():
    """Attention units that matter least go first, but a layer's last head waits for its MLP."""
    units = [Unit(0, "attention", 0, 0.0, 10), Unit(0, "attention", 1, 0.0, 10)]
    units += [Unit(0, "mlp", c, 1.0, 5) for c in range(4)] + [Unit(1, "mlp", c, 2.0, 5) for c in range(4)]
    units += [Unit(1, "attention", 0, 9.0, 10)]
    removed = select_global(units, 30)  # the budget is met as the MLP empties: the head stays
    assert {(u.layer, u.kind, u.index) for u in removed} == {(0, "attention", 0), *((0, "mlp", c) for c in range(4))}
    everything = select_global(units, 35)  # the MLP empties short of the budget: the waiting head goes at once
    assert kept_units(units, everything, 2)[0].empty


def test_a_layer_without_mlp_channels_runs_and_generates():
    model = tiny("llama")
    keep = [LayerUnits((0, 1), tuple(range(24))), LayerUnits((1,), ()), LayerUnits((0,), (0, 5))]
    prune_width(model, keep)
    assert isinstance(model.model.layers[1].mlp, EmptyMLP)
    generate_same_with_and_without_cache(model)


def generate_same_with_and_without_cache(model):
    prompt = IDS[:1, :6]
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=2)
        plain = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=2)
    assert torch.equal(cached, plain)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_a_uniform_plan_exports_as_a_plain_hugging_face_folder(family, tmp_path):
    model = tiny(family, heads=6, kv_heads=3)
    units = unit_importance(model, IDS, 2, "wanda")
    decoder = sum(u.cost for u in units)
    removed = select_uniform(units, decoder // 4)
    keep = kept_units(units, removed, 3)
    assert len({(len(k.kv_heads), len(k.channels)) for k in keep}) == 1
    assert decoder // 4 <= sum(u.cost for u in removed) < decoder // 4 + 3 * units[-1].cost
    prune_width(model, keep)
    assert save_pruned(model, keep, tmp_path) == "transformers"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    config = reloaded.config
    assert (config.num_key_value_heads, config.num_attention_heads, config.head_dim) == (2, 4, 8)
    assert config.intermediate_size == len(keep[0].channels)
    assert torch.equal(logits(reloaded), logits(model))
    generate_same_with_and_without_cache(reloaded)


def test_a_non_uniform_plan_reloads_through_gaprune_identically(tmp_path):
    model = tiny("qwen2", heads=6, kv_heads=3)
    keep = [LayerUnits((0, 2), tuple(range(0, 24, 2))), LayerUnits((1,), ()), LayerUnits((0, 1, 2), (4,))]
    prune_width(model, keep)
    assert save_pruned(model, keep, tmp_path) == "gaprune"
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.py"))  # no pickle, no code
    reloaded = load_width_pruned(tmp_path)
    assert torch.equal(logits(reloaded), logits(model))
    generate_same_with_and_without_cache(reloaded)


def random_units(seed: int, layers: int = 5) -> list[Unit]:
    rng = random.Random(seed)
    units = []
    for layer in range(layers):
        units += [Unit(layer, "attention", i, rng.random(), 40) for i in range(rng.randint(1, 4))]
        units += [Unit(layer, "mlp", i, rng.random() * 3, 7) for i in range(rng.randint(5, 30))]
    return units


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("share", [0.1, 0.25, 0.4, 0.7])
def test_the_knapsack_meets_the_budget_within_one_unit_and_removes_the_cheapest_importance(seed, share):
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


def test_floors_keep_units_in_every_layer_and_an_impossible_budget_is_refused():
    units = random_units(0)
    floors = {(u.layer, u.kind): math.ceil(0.5 * sum(v.layer == u.layer and v.kind == u.kind for v in units))
              for u in units}
    removed = select_global(units, int(0.3 * sum(u.cost for u in units)), floors)
    left = kept_units(units, removed, 5)
    for layer, entry in enumerate(left):
        assert len(entry.kv_heads) >= floors[(layer, "attention")] and len(entry.channels) >= floors[(layer, "mlp")]
    with pytest.raises(ChromosomeError, match="floors leave only"):
        select_global(units, int(0.9 * sum(u.cost for u in units)), floors)


def test_a_plan_is_validated_like_a_chromosome():
    with pytest.raises(ChromosomeError, match="units lists 1 layers but the genes keep 2"):
        ChromosomeRecord((1, 0, 1), "m", 3, units=(LayerUnits((0,), (1,)),))
    with pytest.raises(ChromosomeError, match="ascending, distinct"):
        ChromosomeRecord.from_dict({"format": "gaprune.chromosome", "format_version": 1, "genes": [1], "model": "m",
                                    "num_layers": 1, "units": [{"kv_heads": [1, 0], "channels": []}]})
    with pytest.raises(WidthError, match="at least one key-value head"):
        prune_width(tiny("llama"), [LayerUnits((), (1,)), LayerUnits((0,), ()), LayerUnits((0,), ())])


# -- the command, and healing a plan ----------------------------------------------------------------

def width_command(model_dir, text_file, out, *extra):
    from ga.width import main
    return main(["--model", str(model_dir), "--data", str(text_file), "--seq-len", "32", "--score-tokens", "256",
                 "--importance-tokens", "256", "--batch-size", "4", "--out", str(out), "--no-progress", *extra])


def heal_command(best, out, text_file, held_out, *extra):
    from finetune.best import main
    return main(["--chromosome", str(best), "--out", str(out), "--data", str(text_file), "--eval-texts",
                 str(held_out), "--seq-len", "32", "--eval-seq-len", "32", "--eval-tokens", "512", "--batch-size", "4",
                 "--warmup", "1", "--no-efficiency", "--no-progress", *extra])


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    from tests.tiny import grammar_text
    path = tmp_path_factory.mktemp("held") / "held.txt"
    path.write_text(grammar_text(800, seed=2))
    return path


def reloaded_perplexity(model, held_out, tokenizer_dir):
    from evaluators.perplexity import perplexity
    from evaluators.text import text_blocks
    from transformers import AutoTokenizer
    blocks = text_blocks(str(held_out), AutoTokenizer.from_pretrained(tokenizer_dir), 32, 512)
    return perplexity(model, blocks, 4)[0]


@pytest.mark.parametrize("uniform, loads_with", [(True, "transformers"), (False, "gaprune")])
def test_a_plan_from_the_command_heals_exports_and_reloads_as_it_was_measured(
        llama_dir, text_file, held_out, tmp_path, uniform, loads_with):
    assert width_command(llama_dir, text_file, tmp_path / "plan", "--params", "0.3",
                         *(["--uniform"] if uniform else [])) == 0
    plan = ChromosomeRecord.load(tmp_path / "plan" / "best.json")
    width = plan.extra["width"]
    assert 0.3 <= width["removed_share"] < 0.4 and plan.units is not None and plan.fitness["perplexity"] > 1
    assert width["importance_seconds"] > 0 and width["importance_peak_bytes"] >= width["importance_base_bytes"] > 0
    assert heal_command(tmp_path / "plan" / "best.json", tmp_path / "model", text_file, held_out, "--steps", "0") == 0
    report = json.loads((tmp_path / "model" / "report.json").read_text())
    assert report["loads_with"] == loads_with
    folder = tmp_path / "model"
    model = (AutoModelForCausalLM.from_pretrained(folder) if uniform else load_width_pruned(folder)).eval()
    before = report["before"][str(held_out)]["perplexity"]
    assert reloaded_perplexity(model, held_out, folder) == pytest.approx(before, rel=1e-5)
    assert heal_command(tmp_path / "plan" / "best.json", tmp_path / "healed", text_file, held_out,
                        "--steps", "6", "--plan", "wide") == 0
    healed = json.loads((tmp_path / "healed" / "report.json").read_text())
    assert healed["after"][str(held_out)]["perplexity"] < before


def test_depth_then_width_share_one_budget(llama_dir, text_file, tmp_path):
    depth = tmp_path / "depth.json"
    ChromosomeRecord((1, 0, 1, 1, 0, 1), str(llama_dir), 6).save(depth)  # a third of the layers
    assert width_command(llama_dir, text_file, tmp_path / "both", "--params", "0.5", "--chromosome", str(depth)) == 0
    plan = ChromosomeRecord.load(tmp_path / "both" / "best.json")
    assert plan.removed >= 2 and plan.genes[1] == plan.genes[4] == 0
    assert 0.5 <= plan.extra["width"]["removed_share"] < 0.55
    assert plan.extra["evaluator"]["repair"] == "lsq"  # the depth cut is repaired as a search scores it


@pytest.mark.parametrize("extra, message", [
    (["--params", "1.5"], "params must be a share between 0 and 1"),
    (["--importance", "magnitude"], "importance must be one of taylor, taylor2, wanda"),
    (["--uniform", "--floor", "0.2"], "floor applies to global selection"),
    (["--params", "0.2", "--chromosome", "DEPTH"], "already removes 33.3% of the decoder parameters"),
    (["--params", "0.2"], "exists: choose another --out"),
])
def test_bad_input_is_refused_with_a_clear_message(llama_dir, text_file, tmp_path, capsys, extra, message):
    depth = tmp_path / "depth.json"
    ChromosomeRecord((1, 0, 1, 1, 0, 1), str(llama_dir), 6).save(depth)
    (tmp_path / "plan").mkdir()
    if "exists" in message:
        (tmp_path / "plan" / "best.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_:
        width_command(llama_dir, text_file, tmp_path / "plan", *[str(depth) if e == "DEPTH" else e for e in extra])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "plan" / "best.json").exists() or "exists" in message
