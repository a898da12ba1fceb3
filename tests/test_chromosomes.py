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
