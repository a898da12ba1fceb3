import json
import random

import pytest

from chromosomes import (
    Block, ChromosomeError, ChromosomeRecord, blocks, budget, from_string, layers_removed,
    random_chromosome, repair, to_string, validate,
)


@pytest.mark.parametrize("genes, layers, message", [
    ([1, 1, 0], 4, "3 genes but the model has 4"),
    ([1, 3, 0], 3, "gene 1 is 3"),
    ([1, True, 0], 3, "gene 1 is True"),
    ([0, 2, 1], 3, "gene 1 is MERGE but no KEEP"),
    ([0, 0, 2], 3, "keeps no layer"),
    ([], None, "empty"),
])
def test_invalid_chromosomes_name_the_problem(genes, layers, message):
    with pytest.raises(ChromosomeError, match=message):
        validate(genes, layers)


def test_merge_genes_attach_to_nearest_preceding_keep():
    assert blocks([0, 1, 2, 0, 2, 1, 1, 2]) == (Block(1, (2, 4)), Block(5), Block(6, (7,)))
    assert layers_removed([0, 1, 2, 0, 2, 1, 1, 2]) == 5


@pytest.mark.parametrize("remove, ratio, expected", [(8, None, 8), (None, 0.25, 8), (None, 0.4, 12)])
def test_budget_from_count_or_ratio(remove, ratio, expected):
    assert budget(30, remove=remove, ratio=ratio) == expected


@pytest.mark.parametrize("remove, ratio", [(0, None), (30, None), (None, 1.0), (None, 0.0), (3, 0.5), (None, None)])
def test_impossible_budgets_are_refused(remove, ratio):
    with pytest.raises(ChromosomeError):
        budget(30, remove=remove, ratio=ratio)


@pytest.mark.parametrize("allow_merge", [True, False])
def test_repair_reaches_exact_budget_and_validity_from_any_genes(allow_merge):
    rng = random.Random(0)
    for _ in range(500):
        layers = rng.randint(2, 40)
        removed = rng.randint(1, layers - 1)
        genes = [rng.choice((0, 1, 2)) for _ in range(layers)]
        fixed = repair(genes, removed, rng, allow_merge)
        validate(fixed, layers)
        assert layers_removed(fixed) == removed
        if not allow_merge:
            assert 2 not in fixed


def test_repair_changes_nothing_in_a_chromosome_already_on_budget():
    genes = [1, 0, 1, 2, 1, 1, 0, 1]
    assert repair(genes, 3, random.Random(1)) == genes


def test_random_chromosomes_are_feasible_and_vary():
    rng = random.Random(3)
    seen = {to_string(random_chromosome(30, 8, rng)) for _ in range(50)}
    assert len(seen) == 50
    assert all(layers_removed(from_string(s)) == 8 for s in seen)


def test_string_form_round_trips_and_rejects_garbage():
    assert from_string(to_string([1, 0, 2])) == (1, 0, 2)
    with pytest.raises(ChromosomeError):
        from_string("10x")


def _record() -> ChromosomeRecord:
    fitness = {"perplexity": 31.5, "nll": 3.45, "tokens": 4088, "seq_len": 512,
               "data": "wikitext2-tok:validation", "calibration": {"steps": 0}}
    return ChromosomeRecord((1, 1, 0, 2, 1), "smollm2-135m", 5, fitness, {"run": "demo"})


def test_record_round_trips_through_a_file(tmp_path):
    path = tmp_path / "best.json"
    _record().save(path)
    loaded = ChromosomeRecord.load(path, num_layers=5)
    assert loaded == _record()
    assert loaded.removed == 2


@pytest.mark.parametrize("change, message", [
    ({"format": "other"}, "not a gaprune chromosome"),
    ({"format_version": 99}, "format_version 99"),
    ({"genes": [1, 1, 0, 2]}, "4 genes but the model has 5"),
    ({"genes": "11021"}, "'genes' must be a list"),
    ({"num_layers": "5"}, "'num_layers' must be an integer"),
    ({"fitness": {"perplexity": 3.0}}, "lacks 'nll'"),
])
def test_malformed_records_fail_with_the_field_named(tmp_path, change, message):
    path = tmp_path / "best.json"
    path.write_text(json.dumps({**_record().to_dict(), **change}))
    with pytest.raises(ChromosomeError, match=message):
        ChromosomeRecord.load(path)


def test_record_for_another_depth_is_refused(tmp_path):
    path = tmp_path / "best.json"
    _record().save(path)
    with pytest.raises(ChromosomeError, match="made for a model with 5 decoder layers, but this model has 30"):
        ChromosomeRecord.load(path, num_layers=30)


def test_unreadable_and_non_json_files_are_named(tmp_path):
    with pytest.raises(ChromosomeError, match="cannot read"):
        ChromosomeRecord.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ChromosomeError, match="not valid JSON"):
        ChromosomeRecord.load(tmp_path / "bad.json")


def test_genome_package_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys, chromosomes; assert 'torch' not in sys.modules and 'deap' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- genomes with widths, spaces and parameter budgets ----------------------------------------------

from chromosomes import ParameterBudget, Shape, Space, to_json  # noqa: E402
from chromosomes.space import level_switch, project  # noqa: E402

SHAPE = Shape(num_layers=8, kv_heads=3, channels=96, attention_fixed=4, attention_unit=30, mlp_fixed=4, mlp_unit=3)


def test_width_genes_have_one_text_and_one_json_form():
    genes = (1, 2, (2, 48), 0, (0, 96), 1)
    assert to_string(genes) == "12[2.48]0[0.96]1"
    assert from_string("12[2.48]0[0.96]1") == genes
    assert to_json(genes) == [1, 2, [2, 48], 0, [0, 96], 1]
    assert validate(to_json(genes)) == genes  # JSON's lists read back as the genome's tuples
    for garbage in ("1[2.48", "1[2,48]", "1[.4]", "13"):
        with pytest.raises(ChromosomeError):
            from_string(garbage)


@pytest.mark.parametrize("genes, message", [
    ([1, (0, 0)], "gene 1 keeps nothing of the layer: write 0"),
    ([1, (2, 48), 2], "gene 2 is MERGE but the layer it would fuse into is narrowed"),
    ([1, (2, -1)], "gene 1 is"),
    ([0, (0, 96), 2], "gene 2 is MERGE but the layer it would fuse into is narrowed"),
])
def test_invalid_width_genes_name_the_problem(genes, message):
    with pytest.raises(ChromosomeError, match=message):
        validate(genes)


def test_a_narrowed_layer_is_a_block_of_its_own_and_counts_as_kept():
    assert blocks([1, (2, 48), 0, (0, 96)]) == (Block(0), Block(1, (), 2, 48), Block(3, (), 0, 96))
    assert layers_removed([1, 2, (2, 48), 0]) == 2


def test_a_shape_prices_genes_and_spaces_hold_their_genes():
    assert SHAPE.whole_layer == 4 + 90 + 4 + 288 and SHAPE.layer_parameters((0, 96)) == 4 + 288
    assert SHAPE.layer_parameters((2, 0)) == 4 + 60 and SHAPE.layer_parameters(2) == 0
    joint, sub, layers = (Space(kind, SHAPE, 4) for kind in ("joint", "sublayers", "layers"))
    assert joint.ladder("mlp") == (0, 24, 48, 72, 96) and joint.ladder("attention") == (0, 1, 2, 3)
    assert sub.ladder("mlp") == (0, 96)
    assert joint.contains((2, 48)) and not sub.contains((2, 48)) and sub.contains((0, 96))
    assert not layers.contains((0, 96)) and layers.contains(2) and not Space("joint", SHAPE, 4, merge=False).contains(2)
    with pytest.raises(ChromosomeError, match="gene 1 keeps the whole layer: write 1"):
        joint.check([1, (3, 96)] + [1] * 6)
    with pytest.raises(ChromosomeError, match="not in the sublayers space"):
        sub.check([1, (2, 48)] + [1] * 6)


@pytest.mark.parametrize("kind", ["joint", "sublayers"])
@pytest.mark.parametrize("share", [0.1, 0.267, 0.4, 0.7])
def test_projection_and_level_switches_keep_every_genome_feasible_and_in_its_space(kind, share):
    space = Space(kind, SHAPE, 4)
    budget = ParameterBudget.of(share, space)
    assert budget.remove == -int(-share * SHAPE.dense // 1) or budget.remove >= share * SHAPE.dense
    rng = random.Random(0)
    seen = set()
    for _ in range(300):
        genes = [rng.choice((0, 1, 2, (rng.randint(0, 3), rng.randint(0, 96)))) for _ in range(8)]
        genes = [0 if gene == (0, 0) else 1 if gene == (3, 96) else gene for gene in genes]
        genes = project(genes, space, budget, rng)
        for candidate in (genes, project(level_switch(genes, space, rng), space, budget, rng)):
            space.check(candidate)
            assert budget.feasible(SHAPE.removed(candidate)), (candidate, SHAPE.removed(candidate), budget)
            seen.add(to_string(candidate))
    assert len(seen) > 100


def test_a_budget_is_a_share_or_a_count_and_refuses_the_impossible():
    space = Space("joint", SHAPE, 4)
    assert ParameterBudget.of(0.5, space).remove == SHAPE.dense // 2
    assert ParameterBudget.of(1000, space).remove == 1000
    assert ParameterBudget.of(0.5, space).slack == space.largest_step() == 4 + 72
    with pytest.raises(ChromosomeError, match="cannot remove"):
        ParameterBudget.of(10 ** 9, space)
