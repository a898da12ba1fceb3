"""The search engine on a synthetic fitness: it optimizes, keeps the budget, never re-scores,
and its checkpoint holds everything."""
import itertools
import json
import math
import os
import random
import signal
import statistics
from collections import Counter

import pytest

from chromosomes import Shape, from_string, layers_removed, to_string, validate
from evaluators.fitness import Fitness
from ga import engine
from ga.baselines import random_search
from ga.checkpoint import RunError, RunFolder
from ga.config import SearchConfig
from ga.engine import evolve
from ga.operators import mutate, removed_runs
from ga.seeding import drop_weights, skip_lowest
from ga.surrogate import most_promising
from gaprune.options import terminate_like_interrupt
from tests.synthetic import PlantedEvaluator

TARGET = [1, 1, 0, 1, 2, 1, 1, 1, 0, 2, 1, 1, 1, 1, 0, 1, 1, 2, 1, 1, 0, 1, 1, 0]  # 24 layers, 8 removed


def run(tmp_path, name, evaluator, **settings):
    search = SearchConfig(**{"pop": 20, "gens": 25, "remove": 8, "seed": 0, "init": "random", "patience": 0,
                             **settings})
    return evolve(evaluator, search, RunFolder(tmp_path / name), progress=False)


def test_ga_finds_a_planted_optimum_far_more_often_than_random_search(tmp_path):
    ga_hits = random_hits = 0
    for seed in range(8):
        evaluator = PlantedEvaluator(TARGET)
        state = run(tmp_path, f"s{seed}", evaluator, seed=seed, gens=50)
        ga_hits += state.best()[0] == TARGET
        found = random_search(PlantedEvaluator(TARGET), 8, state.evaluations, seed=seed)
        random_hits += found.genes == TARGET
    assert ga_hits >= 7, ga_hits
    assert random_hits <= 1, random_hits


def test_every_individual_meets_the_budget_and_nothing_is_scored_twice(tmp_path):
    evaluator = PlantedEvaluator(TARGET)
    state = run(tmp_path, "budget", evaluator, gens=10)
    checkpoint = RunFolder(tmp_path / "budget").load_checkpoint()
    for entry in checkpoint["state"]["population"] + checkpoint["state"]["hall_of_fame"]:
        validate(entry["genes"], 24)
        assert layers_removed(entry["genes"]) == 8
    assert max(evaluator.calls.values()) == max(evaluator.screened.values()) == 1
    assert state.evaluations == len(evaluator.calls) == len(state.cache)
    assert state.screenings == len(evaluator.screened) == len(state.screen_cache)
    scored = RunFolder(tmp_path / "budget").scored()  # what benchmarks read: the full scorings alone
    assert scored.keys() == state.cache.keys() and state.screenings > 0
    assert all(scored[key]["nll"] == fitness.nll for key, fitness in state.cache.items())
    with pytest.raises(RunError, match="holds no finished generation"):
        RunFolder(tmp_path / "never-ran").scored()
    assert sum(r["evals"] for r in state.logbook) == state.evaluations
    assert all(r["evals"] + r["hits"] <= 20 for r in state.logbook)


def test_the_population_is_the_best_distinct_chromosomes_scored_so_the_best_never_gets_worse(tmp_path):
    state = run(tmp_path, "plus", PlantedEvaluator(TARGET), gens=15, pop=6)
    bests = [record["best"] for record in state.logbook]
    assert all(later <= earlier for earlier, later in zip(bests, bests[1:]))
    assert bests[-1] < bests[0]
    kept = [to_string(ind) for ind in state.population]
    assert len(set(kept)) == len(kept) == 6
    assert sorted(state.cache[key].value for key in kept) == sorted(f.value for f in state.cache.values())[:6]


def test_skip_only_search_never_merges(tmp_path):
    state = run(tmp_path, "skip", PlantedEvaluator(TARGET), gens=5, merge=False)
    assert all(2 not in ind for ind in state.population)


def test_importance_seeding_starts_from_the_one_shot_chromosome(tmp_path):
    evaluator = PlantedEvaluator(TARGET)
    state = run(tmp_path, "seeded", evaluator, gens=1, init="importance")
    singles = [key for key in evaluator.calls if key.count("0") == 1 and "2" not in key]
    assert len(singles) == 24  # every single-layer removal scored once
    from ga.seeding import single_skips
    one_shot = skip_lowest([state.cache[to_string(genes)].value for genes in single_skips(24)], 8)
    assert state.seeds == [to_string(one_shot)] and state.seeds[0] in state.cache
    saved = RunFolder(tmp_path / "seeded").load_checkpoint()["state"]
    assert saved["seeds"] == state.seeds and saved["history"][0]["best"] in state.cache
    searched = RunFolder(tmp_path / "seeded").scored()  # what benchmarks read: the scans left out
    assert searched.keys() == state.cache.keys() - set(singles) and state.seeds[0] in searched


@pytest.mark.parametrize("remove, expected", [
    (81, [(2, 0), 1, 1]),  # layer 0's MLP alone: the least harm per parameter
    (90, [(2, 0), (0, 8), 1]),  # then layer 1's attention, though layer 0's hurts no more in total
    (200, [(2, 0), 0, (2, 0)]),  # both of layer 1's sub-layers gone: the layer is skipped
])
def test_the_sublayer_seed_drops_what_hurts_least_per_parameter(remove, expected):
    from chromosomes import Shape
    from ga.seeding import drop_cheapest_sublayers, single_sublayer_cuts
    shape = Shape(num_layers=3, kv_heads=2, channels=8, attention_fixed=1, attention_unit=10, mlp_fixed=1, mlp_unit=10)
    assert single_sublayer_cuts(shape)[:2] == [[(0, 8), 1, 1], [(2, 0), 1, 1]]
    harms = [1.0, 1.0, 0.5, 3.0, 5.0, 2.0]  # (attention, MLP) of layers 0, 1, 2; 21 and 81 parameters each
    assert drop_cheapest_sublayers(shape, harms, remove) == expected


def test_influence_seeding_costs_one_evaluation_and_surrounds_the_one_shot_chromosome(tmp_path):
    evaluator = PlantedEvaluator(TARGET)
    state = run(tmp_path, "influence", evaluator, gens=1, init="influence")
    seed = skip_lowest(evaluator.block_influence(), 8)
    first = RunFolder(tmp_path / "influence").load_checkpoint()["state"]["history"][0]
    assert state.seeds == [to_string(seed)] and state.seeds[0] in evaluator.calls
    distances = [sum(a != b for a, b in zip(from_string(key), seed)) for key in first["population"]]
    assert max(distances) <= 6  # 1 to 3 mutations, each changing at most two genes
    assert not any(key.count("0") == 1 and "2" not in key for key in evaluator.calls)  # no single-layer scans
    assert state.evaluations == len(evaluator.calls) + 1  # the dense forward counts as one evaluation


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    a = run(tmp_path, "a", PlantedEvaluator(TARGET), gens=6, seed=3)
    b = run(tmp_path, "b", PlantedEvaluator(TARGET), gens=6, seed=3)
    c = run(tmp_path, "c", PlantedEvaluator(TARGET), gens=6, seed=4)
    assert list(a.logbook) == list(b.logbook)
    assert [list(i) for i in a.population] == [list(i) for i in b.population]
    assert [list(i) for i in a.population] != [list(i) for i in c.population]


@pytest.mark.parametrize("settings", [{}, {"prescreen": 4}])  # the prescreen's regression is refitted from the checkpoint
def test_continuing_in_steps_equals_one_run(tmp_path, settings):
    whole = run(tmp_path, "whole", PlantedEvaluator(TARGET), gens=8, seed=5, **settings)
    run(tmp_path, "steps", PlantedEvaluator(TARGET), gens=3, seed=5, **settings)
    steps = run(tmp_path, "steps", PlantedEvaluator(TARGET), gens=8, seed=5, **settings)
    assert list(steps.logbook) == list(whole.logbook)
    assert steps.best() == whole.best()


def line_count(path):
    return len(path.read_text().splitlines())


def test_lines_logged_by_a_generation_killed_before_its_checkpoint_are_dropped_on_resume(tmp_path):
    whole = run(tmp_path, "whole", PlantedEvaluator(TARGET), gens=6, seed=5)
    run(tmp_path, "killed", PlantedEvaluator(TARGET), gens=3, seed=5)
    folder = tmp_path / "killed"
    for log in ("generations", "evaluations"):  # what generation 4 appended before the kill, the last line cut
        with (folder / f"{log}.jsonl").open("a") as handle:
            handle.write('{"logbook": {"gen": 4}, "history": {}}\n{"key": "0101", "scr')
    covered = json.loads((folder / "checkpoint.json").read_text())["logged"]
    resumed = run(tmp_path, "killed", PlantedEvaluator(TARGET), gens=6, seed=5)
    assert list(resumed.logbook) == list(whole.logbook) and resumed.cache == whole.cache
    assert line_count(folder / "generations.jsonl") == 7 == covered["logbook"] + 3
    assert line_count(folder / "evaluations.jsonl") == len(whole.cache) + len(whole.screen_cache)
    assert RunFolder(folder).load_checkpoint() == RunFolder(tmp_path / "whole").load_checkpoint()


def test_a_version_1_checkpoint_with_everything_inline_resumes_exactly(tmp_path):
    whole = run(tmp_path, "whole", PlantedEvaluator(TARGET), gens=6, seed=5)
    run(tmp_path, "old", PlantedEvaluator(TARGET), gens=3, seed=5)
    folder = tmp_path / "old"
    inline = RunFolder(folder).load_checkpoint()
    del inline["logged"]
    (folder / "checkpoint.json").write_text(json.dumps({**inline, "version": 1}))
    for log in ("generations", "evaluations"):
        (folder / f"{log}.jsonl").unlink()
    resumed = run(tmp_path, "old", PlantedEvaluator(TARGET), gens=6, seed=5)
    assert list(resumed.logbook) == list(whole.logbook) and resumed.cache == whole.cache
    assert RunFolder(folder).load_checkpoint() == RunFolder(tmp_path / "whole").load_checkpoint()


def test_the_checkpoint_stays_the_same_size_as_the_run_grows(tmp_path):
    run(tmp_path, "grow", PlantedEvaluator(TARGET), gens=5, pop=8)
    early = (tmp_path / "grow" / "checkpoint.json").stat().st_size
    state = run(tmp_path, "grow", PlantedEvaluator(TARGET), gens=60, pop=8)
    assert state.generation == 60 and len(state.cache) > 4 * 5 * 2
    assert (tmp_path / "grow" / "checkpoint.json").stat().st_size < 1.1 * early
    assert line_count(tmp_path / "grow" / "generations.jsonl") == 61


def test_resume_refuses_another_budget_or_fitness_and_a_finished_run(tmp_path):
    run(tmp_path, "r", PlantedEvaluator(TARGET), gens=2)
    with pytest.raises(RunError, match="the run removes 8 layers, this asks for one that removes 6 layers"):
        run(tmp_path, "r", PlantedEvaluator(TARGET), gens=3, remove=6)
    with pytest.raises(RunError, match="num_layers"):
        run(tmp_path, "r", PlantedEvaluator(TARGET[:-1] + [1, 1]), gens=3)
    with pytest.raises(RunError, match="search settings differ.*tournament"):
        run(tmp_path, "r", PlantedEvaluator(TARGET), gens=3, tournament=5)
    with pytest.raises(RunError, match="already finished 2 generations"):
        run(tmp_path, "r", PlantedEvaluator(TARGET), gens=2)


def test_a_run_saved_before_seam_moves_resumes_with_them_off(tmp_path):
    """A setting added since a run was saved takes the value the run ran with (seam moves off):
    the old run continues exactly, and asking it for seam moves is refused by name."""
    whole = run(tmp_path, "whole", PlantedEvaluator(TARGET), gens=4, seam_prob=0.0)
    run(tmp_path, "old", PlantedEvaluator(TARGET), gens=2, seam_prob=0.0)
    path = tmp_path / "old" / "checkpoint.json"
    checkpoint = json.loads(path.read_text())
    del checkpoint["search"]["seam_prob"]  # as written before the setting existed
    path.write_text(json.dumps(checkpoint))
    with pytest.raises(RunError, match="search settings differ.*seam_prob"):
        run(tmp_path, "old", PlantedEvaluator(TARGET), gens=4)
    resumed = run(tmp_path, "old", PlantedEvaluator(TARGET), gens=4, seam_prob=0.0)
    assert list(resumed.logbook) == list(whole.logbook)


def test_best_json_describes_the_best_individual(tmp_path):
    from chromosomes import ChromosomeRecord
    state = run(tmp_path, "best", PlantedEvaluator(TARGET), gens=4)
    record = ChromosomeRecord.load(tmp_path / "best" / "best.json", num_layers=24)
    genes, fitness = state.best()
    assert list(record.genes) == genes and record.fitness["perplexity"] == fitness.perplexity
    assert record.fitness["data"] == "synthetic" and record.extra["generation"] == 4
    assert to_string(genes) in state.cache


def test_tensorboard_holds_curves_histogram_layer_maps_and_best_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    state = run(tmp_path, "tb", PlantedEvaluator(TARGET), gens=4)
    events = EventAccumulator(str(tmp_path / "tb" / "tb"), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    for tag in ("perplexity/best", "perplexity/mean", "perplexity/median", "perplexity/worst", "population/diversity",
                "evaluations/new", "evaluations/cache_hits", "speed/evaluations_per_second",
                "speed/seconds_per_generation"):
        assert tag in tags["scalars"], tag
    assert [e.value for e in events.Scalars("perplexity/best")] == pytest.approx([r["best"] for r in state.logbook])
    assert [e.step for e in events.Scalars("evaluations/new")] == [0, 1, 2, 3, 4]
    assert "population/perplexity" in tags["histograms"]
    best_map = events.Images("layer_map/best")[-1]
    assert (best_map.width, best_map.height) == (24 * 8, 5 * 8)  # a row per generation, a column per layer
    assert "layer_map/frequency" in tags["images"]
    assert "best/chromosome/text_summary" in tags["tensors"]


def test_resumed_run_logs_each_generation_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run(tmp_path, "tb2", PlantedEvaluator(TARGET), gens=2)
    run(tmp_path, "tb2", PlantedEvaluator(TARGET), gens=4)
    events = EventAccumulator(str(tmp_path / "tb2" / "tb"), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("perplexity/best")] == [0, 1, 2, 3, 4]


def test_max_evals_is_spent_exactly_cutting_the_last_generation_short(tmp_path):
    evaluator = PlantedEvaluator(TARGET)
    state = run(tmp_path, "cap", evaluator, gens=50, max_evals=100)
    spent = engine.evaluations_spent(state, SearchConfig(), evaluator.describe())
    assert state.evaluations == len(evaluator.calls) and 99 < spent <= 100  # a screening: 1/4 of an evaluation
    assert state.generation < 50
    assert engine.stop_reason(state, SearchConfig(max_evals=100), evaluator.describe()).startswith("spent")
    with pytest.raises(RunError, match="already finished"):  # and nothing is left to resume
        run(tmp_path, "cap", PlantedEvaluator(TARGET), gens=50, max_evals=100)


def test_patience_ends_a_run_that_stopped_improving_and_says_why(tmp_path):
    class Flat(PlantedEvaluator):  # every chromosome equally good: nothing ever improves
        def evaluate(self, population, tokens=None):
            return [engine.Fitness(5.0, math.log(5.0), 100) for _ in population]

    search = SearchConfig(pop=8, gens=100, remove=8, init="random", patience=3)
    state = evolve(Flat(TARGET), search, RunFolder(tmp_path / "flat"), progress=False)
    assert state.generation == 3
    assert engine.stop_reason(state, search, Flat(TARGET).describe()) == \
        "no better chromosome in 3 generations (--patience 3)"
    improving = run(tmp_path, "improving", PlantedEvaluator(TARGET), gens=12, patience=3)
    bests = [r["best"] for r in improving.logbook]
    assert engine.generations_without_progress(bests) == len(bests) - 1 - bests.index(min(bests))


def test_patience_only_ends_a_run_so_a_longer_run_replays_every_shorter_patience(tmp_path):
    """What experiments.patience relies on: the same seed follows the same path whatever the
    patience, and stops where the replay of the longer run says."""
    from experiments.patience import stopping_generation
    longer = run(tmp_path, "longer", PlantedEvaluator(TARGET), gens=30, pop=6)
    bests = [r["best"] for r in longer.logbook]
    stop = stopping_generation(bests, 2)
    assert stop < 30  # the planted landscape has plateaus of two generations
    shorter = run(tmp_path, "shorter", PlantedEvaluator(TARGET), gens=30, pop=6, patience=2)
    assert shorter.generation == stop
    assert shorter.logbook == longer.logbook[:stop + 1] and shorter.history == longer.history[:stop + 1]


@pytest.mark.parametrize("patience, gens, stop", [
    (0, 0, 6), (1, 0, 2), (2, 0, 5), (3, 0, 6), (9, 0, 6),
    (0, 4, 4), (2, 4, 4), (1, 4, 2), (0, 99, 6),  # --gens caps it, patience may stop it sooner
])
def test_a_replayed_patience_stops_where_the_run_would_have(patience, gens, stop):
    """experiments.patience: a run stops at the first generation whose best is `patience` old,
    or at generation `gens`."""
    from experiments.patience import stopping_generation
    bests = [5.0, 4.0, 4.0, 3.0, 3.0, 3.0, 2.5]
    assert stopping_generation(bests, patience, gens) == stop


def test_replayed_stops_are_summarized_against_each_runs_end():
    """Runs of different budgets are compared by their distance from their own end, not by their
    dev perplexities, which differ by budget."""
    from experiments.patience import summarize
    rows = [{"run": run, "gens": 0, "patience": 5, "stops at generation": g, "evaluations": e,
             "share of the run's evaluations": e / 100, "dev mean vs the run's end %": d}
            for run, g, e, d in (("a", 10, 50, 2.0), ("b", 30, 90, -1.0))]
    [row] = summarize(rows)
    assert row["runs"] == 2 and row["evaluations"] == 70 and row["dev mean vs the run's end %"] == 0.5
    assert row["worst run %"] == 2.0


@pytest.mark.parametrize("settings, expected", [
    ({}, (2, 8, 8)),  # the joint space
    ({"space": "sublayers"}, (4, 4, 3)),
    ({"remove": 8}, (4, 4, 3)),  # whole layers
    ({"offspring": 3, "tournament": 2}, (3, 8, 2)),  # what is given wins
])
def test_selection_defaults_follow_the_space_and_are_saved_resolved(settings, expected):
    search = SearchConfig(**settings)
    assert (search.offspring, search.screen_factor, search.tournament) == expected
    assert SearchConfig.from_dict(search.to_dict()) == search  # a run folder keeps what it ran with


def test_screening_fully_scores_only_the_best_screened_offspring(tmp_path):
    class Recording(PlantedEvaluator):
        def __init__(self, target):
            super().__init__(target)
            self.requests = []

        def evaluate(self, population, tokens=None):
            self.requests.append((tokens, [list(g) for g in population]))
            return super().evaluate(population, tokens)

    evaluator = Recording(TARGET)
    state = run(tmp_path, "screen", evaluator, gens=6, screen_tokens=2048, screen_factor=3, offspring=2)
    requests, judge = evaluator.requests, PlantedEvaluator(TARGET)
    assert [tokens for tokens, _ in requests] == [2048, None] * 7  # each generation: screen, then score
    for (_, screened), (_, full) in zip(requests[::2], requests[1::2]):
        assert len(screened) <= 6  # 3 candidates per offspring, fewer when some were known
        best = sorted(screened, key=lambda genes: judge.evaluate([genes], 2048)[0].value)[:2]
        assert sorted(full) == sorted(best)
    assert state.screenings == sum(len(batch) for _, batch in requests[::2])
    assert state.logbook[-1]["screenings"] == state.screenings


def test_screenings_count_against_the_budget_by_the_share_of_tokens_they_read(tmp_path):
    class Windows(PlantedEvaluator):
        def describe(self):  # 10 scoring windows of 11 tokens: 100 predicted tokens
            return {**super().describe(), "seq_len": 11, "tokens": 100}

    state = run(tmp_path, "screen-budget", Windows(TARGET), gens=50, max_evals=60, screen_tokens=22, screen_factor=3)
    spent = [r["total_evals"] + 0.2 * r["screenings"] for r in state.logbook]  # a screening reads 2 of 10 windows
    assert state.screenings > 0
    assert 59 < spent[-1] <= 60 + 1e-9  # the budget is spent, never overshot
    assert state.evaluations < 60  # so screenings were counted
    from experiments.patience import evaluations_by_generation, read_generations
    replayed = evaluations_by_generation(tmp_path / "screen-budget", read_generations(tmp_path / "screen-budget"))
    assert replayed == pytest.approx(spent)  # experiments.patience reads a run folder as the budget counted it


def test_screening_spends_full_evaluations_only_on_new_chromosomes(tmp_path):
    # A small population soon breeds mostly copies of its parents; those must not take the
    # places that screening hands out, or full evaluations stop.
    state = run(tmp_path, "screen-new", PlantedEvaluator(TARGET), pop=6, gens=12, offspring=3)
    new_per_generation = [r["evals"] for r in state.logbook]
    assert new_per_generation == [3] * 13  # --offspring, every generation
    assert set(state.cache) <= set(state.screen_cache)


def test_the_prescreen_ranks_new_genomes_as_a_fitness_additive_over_layers_does():
    shape = Shape(num_layers=4, kv_heads=3, channels=8, attention_fixed=1, attention_unit=10, mlp_fixed=1, mlp_unit=5)
    cost = [(0.9, 0.1), (0.2, 0.6), (0.5, 0.5), (0.1, 0.3)]  # per layer: what its attention and MLP lose when removed

    def fitness(genes):
        nll = 2.0
        for gene, (attention, mlp) in zip(genes, cost):
            kv_heads, channels = shape.counts(gene)
            nll += attention * (1 - kv_heads / 3) ** 2 + mlp * (1 - channels / 8)
        return Fitness(math.exp(nll), nll, 100)

    rng = random.Random(0)
    genomes = list(dict.fromkeys(to_string([shape.gene(rng.randint(0, 3), rng.randint(0, 8)) for _ in range(4)])
                                 for _ in range(80)))
    screened = {key: fitness(from_string(key)) for key in genomes[:40]}
    new = genomes[40:60]
    best = sorted(new, key=lambda key: fitness(from_string(key)).value)[:5]
    assert most_promising(new, screened, shape, 5) == best
    assert most_promising(new, dict(list(screened.items())[:4]), shape, 5) == new[:5]  # too few screenings: as bred


def test_prescreening_finds_a_planted_optimum_more_often_at_equal_evaluations(tmp_path):
    hits = {1: 0, 4: 0}
    for prescreen, seed in itertools.product(hits, range(8)):
        state = run(tmp_path, f"p{prescreen}-s{seed}", PlantedEvaluator(TARGET), gens=200, max_evals=120, seed=seed,
                    prescreen=prescreen)
        hits[prescreen] += state.best()[0] == TARGET
    assert hits[4] >= 7 and hits[1] <= 3, hits


def test_the_prescreen_study_replays_a_runs_generations_from_its_checkpoint(tmp_path):
    from experiments.prescreen_study import replay, screenings_by_generation
    run(tmp_path, "logged", PlantedEvaluator(TARGET), gens=12, seed=1, prescreen=4)
    checkpoint = RunFolder(tmp_path / "logged").load_checkpoint()
    generations = screenings_by_generation(checkpoint)
    assert len(generations) == 13 and sum(len(g) for g in generations) == checkpoint["state"]["screenings"]
    replayed = replay(generations, Shape(24, 1, 1, 0, 0, 0, 0), 1e-3)
    assert [r["generation"] for r in replayed] == list(range(1, 13))
    assert statistics.mean(r["spearman"] for r in replayed[4:]) > 0.5  # the planted fitness is additive over layers


def test_drop_weights_fade_layers_whose_single_removal_is_catastrophic():
    nll = [2.0 + 0.01 * i for i in range(22)] + [9.0, 12.0]  # the last two are vital
    weights = drop_weights(nll, removed=4)
    assert weights[0] == 1.0
    assert weights[8] == pytest.approx(math.exp(-1))  # the layer ranked 2 x removed
    assert weights[1] > weights[5] > weights[8] > weights[21] > 0.05
    assert max(weights[22:]) < 1e-30
    assert drop_weights([3.0] * 6, removed=2) == [1.0] * 6  # nothing learned: uniform


def test_guided_mutation_removes_layers_in_proportion_to_their_weights():
    parent = [0, 0, 1, 1, 1, 1]
    weights = [1.0, 1.0, 0.0, 1.0, 3.0, 0.0]
    rng = random.Random(0)
    removed = Counter()
    for _ in range(4000):
        child = list(parent)
        mutate(child, removed=2, merge=False, flip_prob=0.0, rng=rng, drop_weights=weights)
        removed.update(i for i in (2, 3, 4, 5) if child[i] == 0)
    assert removed[2] == removed[5] == 0
    assert removed[4] / removed[3] == pytest.approx(3.0, rel=0.15)
    child = list(parent)  # every kept layer vital (weights underflowed to 0): still a valid move
    mutate(child, removed=2, merge=False, flip_prob=0.0, rng=rng, drop_weights=[1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    assert layers_removed(child) == 2 and child != parent


def test_seam_moves_never_add_a_run_of_removed_layers_and_join_runs_that_swaps_leave_apart():
    rng = random.Random(0)
    parent = [1, 0, 1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 0, 1, 1, 1]  # 4 runs
    joined = Counter()
    for seam_prob, counts in ((1.0, joined), (0.0, Counter())):
        for _ in range(2000):
            child = list(parent)
            mutate(child, removed=5, merge=False, flip_prob=0.0, rng=rng, seam_prob=seam_prob)
            assert layers_removed(child) == 5
            counts[len(removed_runs(child))] += 1
        if seam_prob == 1.0:
            assert max(joined) == 4 and joined[3] > 1100  # never more runs; more than half the moves join two
        else:
            assert counts[5] > 200 and counts[3] < 0.6 * joined[3]  # plain swaps also scatter
    one_run = [0, 0, 0, 1, 1, 1]  # the run can only slide right: the move exists and keeps one run
    for _ in range(50):
        child = list(one_run)
        mutate(child, removed=3, merge=False, flip_prob=0.0, rng=rng, seam_prob=1.0)
        assert removed_runs(child) == [(1, 3)]
    single = [1, 1, 0, 1, 1]  # no seam move for a single removed layer: a plain swap instead
    child = list(single)
    mutate(child, removed=1, merge=False, flip_prob=0.0, rng=rng, seam_prob=1.0)
    assert layers_removed(child) == 1 and child != single


def test_importance_seeding_steers_mutation_away_from_vital_layers(tmp_path, monkeypatch):
    class VitalLayers(PlantedEvaluator):
        """The planted fitness, except that removing layer 0 or 1 is a catastrophe."""

        def evaluate(self, population, tokens=None):
            return [fitness if genes[0] and genes[1] else type(fitness)(fitness.perplexity * 1e4,
                    fitness.nll + math.log(1e4), fitness.tokens, 0.0, False)
                    for genes, fitness in zip(population, super().evaluate(population, tokens))]

    def hopeless_share(state):
        proposed = set(state.cache) | set(state.screen_cache)
        searched = [key for key in proposed if key.count("0") + key.count("2") > 1]  # not a single skip
        return sum(key[0] != "1" or key[1] != "1" for key in searched) / len(searched)

    guided = run(tmp_path, "guided", VitalLayers(TARGET), gens=10, init="importance")
    monkeypatch.setattr(engine, "mutation_weights", lambda *args: None)
    uniform = run(tmp_path, "uniform", VitalLayers(TARGET), gens=10, init="importance")
    assert hopeless_share(guided) < 0.05 < 0.1 < hopeless_share(uniform)  # measured: 0.017 and 0.19


def test_a_runs_requests_are_read_back_in_the_order_it_made_them(tmp_path):
    """experiments.throughput replays a run's scoring calls from its folder: the seeding scans,
    then each generation's screenings and full evaluations, each chromosome once."""
    from experiments.throughput import run_requests

    evaluator = PlantedEvaluator(TARGET)
    state = run(tmp_path, "replayed", evaluator, gens=4, init="importance")
    requests = run_requests(RunFolder(tmp_path / "replayed").load_checkpoint(), 1024)
    assert requests[0] == (None, list(state.cache)[:24])  # the single-layer scans
    full = [key for tokens, keys in requests if tokens is None for key in keys]
    screened = [key for tokens, keys in requests if tokens == 1024 for key in keys]
    assert full == list(state.cache) and screened == list(state.screen_cache)
    assert full == list(evaluator.calls) and screened == list(evaluator.screened)  # the run's own order
    first = run_requests(RunFolder(tmp_path / "replayed").load_checkpoint(), 1024, generations=1)
    assert requests[:len(first)] == first and len(first) < len(requests)  # a prefix, generation by generation
    assert sum(len(keys) for tokens, keys in first if tokens is None) == state.logbook[1]["total_evals"]


def test_an_interrupt_whose_exception_was_lost_stops_the_run_after_the_next_checkpoint(tmp_path):
    """Python drops exceptions raised inside __del__ methods and weakref callbacks, so Ctrl-C can
    land where its KeyboardInterrupt is lost; the run must still stop, at a generation boundary."""
    class LosesTheInterrupt(PlantedEvaluator):
        def evaluate(self, population, tokens=None):
            if len(self.calls) > 40 and self.interrupted is None:
                self.interrupted = json.loads((tmp_path / "lost" / "checkpoint.json").read_text())["state"]["generation"]
                try:
                    os.kill(os.getpid(), signal.SIGINT)  # handled here, as if inside a __del__
                except KeyboardInterrupt:
                    pass
            return super().evaluate(population, tokens)

    evaluator = LosesTheInterrupt(TARGET)
    evaluator.interrupted = None  # the generation last checkpointed when the signal came
    search = SearchConfig(pop=20, gens=1000, remove=8, seed=0, init="random", patience=0)
    outside = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even under nohup
    try:
        with pytest.raises(KeyboardInterrupt):
            with terminate_like_interrupt() as stop_if_interrupted:
                evolve(evaluator, search, RunFolder(tmp_path / "lost"), progress=False,
                       between_generations=stop_if_interrupted)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are restored
    finally:
        signal.signal(signal.SIGINT, outside)
    stopped = json.loads((tmp_path / "lost" / "checkpoint.json").read_text())["state"]["generation"]
    assert stopped == evaluator.interrupted + 1  # the generation under way finished, then it stopped
