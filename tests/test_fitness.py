"""The fitness interface: numbers that respond to the chromosome, and nothing that leaks between calls."""
import json
import math

import pytest
import torch

from chromosomes import ChromosomeError
from evaluators.calibration import norm_parameters
from evaluators.config import EvaluatorConfig
from evaluators.families import family_of
from evaluators.fitness import DeviceMemoryError, ModelEvaluator
from tests.tiny import FAMILIES, MERGEABLE, REPAIRABLE

DENSE = [1, 1, 1, 1, 1, 1]
POPULATION = [[1, 0, 1, 1, 0, 1], [1, 0, 1, 1, 1, 0], [1, 1, 0, 1, 1, 0], [1, 2, 1, 1, 0, 1], [1, 0, 1, 2, 1, 0]]


def make(folder, text_file, **overrides):
    settings = dict(model=str(folder), data=str(text_file), seq_len=32, score_tokens=256, batch_size=3,
                    align_tokens=64)
    return ModelEvaluator(EvaluatorConfig(**{**settings, **overrides}))


@pytest.fixture(scope="module")
def evaluator(llama_dir, text_file):
    return make(llama_dir, text_file)


def test_removing_layers_changes_perplexity(evaluator):
    dense, skipped, merged = evaluator.evaluate([DENSE, POPULATION[0], POPULATION[3]])
    assert 1 < dense.perplexity < 1000 and math.isclose(dense.perplexity, math.exp(dense.nll))
    assert dense.tokens == 8 * 31
    assert abs(skipped.perplexity - dense.perplexity) > 0.01 * dense.perplexity
    assert abs(merged.perplexity - skipped.perplexity) > 1e-4 * dense.perplexity


def test_prefix_sharing_gives_bit_identical_results_in_any_order(llama_dir, text_file, evaluator):
    shared = evaluator.evaluate(POPULATION)
    shuffled = evaluator.evaluate(POPULATION[::-1])[::-1]
    independent = make(llama_dir, text_file, share_prefix=False).evaluate(POPULATION)
    assert [f.nll for f in shared] == [f.nll for f in independent] == [f.nll for f in shuffled]


def test_fewer_tokens_scores_on_a_prefix_of_the_scoring_text(evaluator):
    low, = evaluator.evaluate([POPULATION[1]], tokens=64)
    full, = evaluator.evaluate([POPULATION[1]])
    assert low.tokens == 2 * 31 and full.tokens == 8 * 31
    assert low.nll != full.nll
    with pytest.raises(ChromosomeError, match="cannot score on 4096 tokens"):
        evaluator.evaluate([POPULATION[1]], tokens=4096)


def test_bad_chromosomes_are_refused_before_any_work(evaluator):
    with pytest.raises(ChromosomeError, match="5 genes but the model has 6"):
        evaluator.evaluate([POPULATION[0], [1, 1, 1, 1, 1]])


@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_changes_fitness_and_restores_every_weight(family, tiny_models, text_file):
    """On every family: A, B, A score the same; calibration trains the family's own layer norms
    and the final norm, nothing else; every weight is restored bit for bit."""
    repair = "lsq" if family in REPAIRABLE else "none"
    cuts = POPULATION if family in MERGEABLE else [g for g in POPULATION if 2 not in g]
    plain = make(tiny_models[family], text_file, repair=repair)
    calibrated = make(tiny_models[family], text_file, calib_steps=4, calib_lr=0.05, repair=repair)
    model = calibrated.model
    weights = {name: p.clone() for name, p in model.named_parameters()}
    trained = {id(p) for p in norm_parameters(model, calibrated.builder.dense_layers, calibrated.family)}
    norms = {name for name, p in model.named_parameters() if id(p) in trained}
    own = family_of(model).layer_norms
    assert norms == {f"model.layers.{i}.{norm}.weight" for i in range(6) for norm in own} | {"model.norm.weight"}
    a, b = cuts[0], cuts[-1]
    first_a, = calibrated.evaluate([a])
    calibrated.evaluate([b])
    second_a, = calibrated.evaluate([a])
    assert first_a == second_a
    assert first_a.nll != plain.evaluate([a])[0].nll
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    assert not any(p.requires_grad for p in model.parameters())


def test_calibration_lowers_perplexity_of_a_damaged_model(llama_dir, text_file):
    damaged = [1, 0, 0, 1, 0, 1]
    plain = make(llama_dir, text_file).evaluate([damaged])[0]
    tuned = make(llama_dir, text_file, calib_steps=8, calib_lr=0.05).evaluate([damaged])[0]
    assert tuned.perplexity < plain.perplexity


def test_description_records_how_fitness_was_measured(evaluator):
    described = evaluator.describe()
    assert described["tokens"] == 8 * 31 and described["seq_len"] == 32 and described["num_layers"] == 6
    assert described["calibration"]["steps"] == 0 and described["merge"]["rule"] == "mean"


@pytest.mark.parametrize("field, value, message", [
    ("seq_len", 1, "seq_len must be at least 2"),
    ("score_tokens", 16, "must hold at least one window"),
    ("merge_rule", "max", "merge_rule must be one of"),
    ("calib_lr", -1.0, "calib_lr must be a positive number"),
    ("batch_size", 0, "batch_size must be a positive integer"),
    ("ranking", "magnitude", "ranking must be one of taylor, taylor2, wanda, obs, auto"),
    ("repair", "none", "ranking obs orders units by what the refit .* loses: it needs a repair"),
    ("refit", False, "ranking obs .* needs a repair and the refit"),
])
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        EvaluatorConfig(**{field: value, **({"ranking": "obs"} if field in ("repair", "refit") else {})})


@pytest.mark.parametrize("settings, ranking, importance", [
    ({}, "obs", "taylor2"),
    ({"repair": "none"}, "taylor2", "taylor2"),
    ({"refit": False}, "taylor2", "taylor2"),
    ({"ranking": "wanda"}, "wanda", "wanda"),
    ({"ranking": "obs", "repair": "scale"}, "obs", "taylor2"),
])
def test_the_default_ranking_is_obs_where_narrowed_layers_are_refitted_and_taylor2_elsewhere(settings, ranking,
                                                                                           importance):
    config = EvaluatorConfig(**settings)
    assert (config.unit_ranking, config.importance) == (ranking, importance)
    assert config.to_dict()["ranking"] == settings.get("ranking", "auto")  # saved as chosen: auto stays a rule


def test_a_run_ranked_by_obs_can_be_exported_without_a_repair():
    obs = EvaluatorConfig(ranking="obs")
    assert obs.with_repair("none").unit_ranking == "taylor2" and obs.with_repair("scale").unit_ranking == "obs"
    assert EvaluatorConfig(ranking="wanda").with_repair("none").ranking == "wanda"


def test_settings_saved_before_the_ranking_existed_read_back_as_taylor2():
    saved = {k: v for k, v in EvaluatorConfig().to_dict().items() if k not in ("ranking", "refit")}
    assert EvaluatorConfig.from_saved(saved).unit_ranking == "taylor2"


def test_config_round_trips_and_rejects_unknown_keys():
    config = EvaluatorConfig(seq_len=128, calib_steps=3)
    assert EvaluatorConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown evaluator setting"):
        EvaluatorConfig.from_dict({"seq_length": 3})


def test_calibration_in_bf16_trains_fp32_masters_and_restores_the_bf16_weights_bit_for_bit(llama_dir, text_file):
    plain = make(llama_dir, text_file, dtype="bfloat16", repair="none")
    calibrated = make(llama_dir, text_file, dtype="bfloat16", repair="none", calib_steps=2, calib_lr=0.01)
    weights = {name: p.clone() for name, p in calibrated.model.named_parameters()}
    raw, = plain.evaluate([POPULATION[0]])
    tuned, = calibrated.evaluate([POPULATION[0]])
    assert tuned.nll != raw.nll  # in bf16 without fp32 masters the step was lost
    assert all(p.dtype == torch.bfloat16 and torch.equal(p, weights[name])
               for name, p in calibrated.model.named_parameters())


def running_out_of_memory_above(evaluator, windows: int):
    """Make every forward of more than `windows` windows fail as a GPU out of memory does."""
    def check(_module, args):
        if args[0].shape[0] > windows:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {args[0].shape[0]} windows)")
    return evaluator.model.model.embed_tokens.register_forward_pre_hook(check)


@pytest.mark.parametrize("batch_size, fits, halved_to", [(4, 2, 2), (4, 1, 1), (3, 1, 1)])
def test_out_of_memory_scores_again_with_fewer_windows_per_forward(llama_dir, text_file, batch_size, fits, halved_to):
    evaluator = make(llama_dir, text_file, batch_size=batch_size)
    hook = running_out_of_memory_above(evaluator, fits)
    scored = evaluator.evaluate(POPULATION)
    hook.remove()
    assert evaluator.batch_size == halved_to
    expected = make(llama_dir, text_file, batch_size=halved_to).evaluate(POPULATION)
    assert [f.nll for f in scored] == [f.nll for f in expected]


def test_out_of_memory_at_one_window_says_what_to_change(llama_dir, text_file):
    evaluator = make(llama_dir, text_file, batch_size=2)
    running_out_of_memory_above(evaluator, 0)
    with pytest.raises(DeviceMemoryError, match="out of memory on cpu scoring one window of 32 tokens.*--seq-len"):
        evaluator.evaluate(POPULATION[:2])


def test_the_gpu_benchmark_runs_end_to_end_on_a_tiny_shape(tmp_path):
    """experiments/gpu_bench --smoke: every part of the one-call GPU benchmark, on the CPU."""
    import json
    from experiments import gpu_bench

    gpu_bench.main(["--smoke", "--rounds", "2", "--population", "3", "--out-dir", str(tmp_path)])
    rows = {row["part"]: row for row in json.loads((tmp_path / "gpu_bench-smoke.json").read_text())["rows"]}
    assert {"fitness, naive", "fitness, gaprune", "fitness, gaprune / naive", "alignment statistics",
            "alignment, greedy (device)", "alignment, hungarian (CPU)"} <= set(rows)
    assert rows["fitness, gaprune"]["evaluations/s"] > 0 and rows["fitness, gaprune"]["TFLOP/s"] > 0
    calibrated = rows["fitness, calibrated (2 norm steps)"]
    repaired = rows["fitness, seam-repaired (lsq, 1024 tokens)"]
    assert math.isfinite(calibrated["perplexity"]) and math.isfinite(repaired["perplexity"])
    assert rows["alignment statistics"]["units"] == 256 and rows["alignment statistics"]["tokens"] == 2048
    greedy_fit = rows["alignment, greedy (device)"]["mean correlation"]
    assert 0.9 * rows["alignment, hungarian (CPU)"]["mean correlation"] <= greedy_fit
    assert (tmp_path / "gpu_bench-smoke.md").read_text().startswith("| part |")


@pytest.mark.parametrize("saved, ranking", [({}, "taylor2"), ({"ranking": "obs"}, "obs"), ({"ranking": "auto"}, "obs")])
def test_the_dev_oracle_repairs_as_the_benchmark_it_reads_did(tmp_path, monkeypatch, saved, ranking):
    """Its genomes are cut and repaired with the benchmark's saved settings, whatever today's
    defaults are (settings saved before the ranking was one read back as taylor2), in the saved
    dtype on the device asked for (a GPU benchmark's genomes scored on the CPU alike)."""
    import argparse
    import experiments.dev_oracle as oracle
    monkeypatch.setattr(oracle, "RESULTS", tmp_path)
    evaluator = {"repair": "lsq", "refit": True, "fitness": "kl", "device": "cuda", "dtype": "float32", **saved}
    (tmp_path / "bench.json").write_text(json.dumps({"evaluator": evaluator, "settings": {"dev_tokens": 16384}}))
    args = argparse.Namespace(data_dir="data", threads=2, fresh_windows=0, device="cpu", dev_tokens=16384)
    config, same_dev = oracle.benchmark_config("bench", tmp_path / "work", args)
    more_dev = argparse.Namespace(**{**vars(args), "dev_tokens": 65536})
    assert same_dev and not oracle.benchmark_config("bench", tmp_path / "work", more_dev)[1]
    assert (config.unit_ranking, config.fitness, config.align_cache) == (ranking, "ppl", str(tmp_path / "work" / "store"))
    assert (config.device, config.dtype) == ("cpu", "float32")
    with pytest.raises(SystemExit, match="--benchmark other: no .*other.json"):
        oracle.benchmark_config("other", tmp_path / "work", args)


def test_dev_figures_are_kept_per_amount_of_dev_text(tmp_path):
    """A study on more dev text than an earlier one measures its genomes again instead of reading
    back the earlier figures; one on as much reads them back."""
    from experiments.dev_oracle import dev_figures

    class Counting:
        calls = 0

        def heldout(self, genes, dev):
            self.calls += 1
            return {name: float(blocks.shape[0]) for name, blocks in dev.items()}

    evaluator, short, long = Counting(), {"t": torch.zeros(2, 8)}, {"t": torch.zeros(4, 8)}
    assert dev_figures(evaluator, "1111", short, tmp_path) == {"t": 2.0}
    assert dev_figures(evaluator, "1111", short, tmp_path) == {"t": 2.0} and evaluator.calls == 1
    assert dev_figures(evaluator, "1111", long, tmp_path) == {"t": 4.0} and evaluator.calls == 2


def test_the_dev_oracle_re_ranks_each_runs_best_genomes_by_each_fitness():
    """experiments/dev_oracle --fresh-windows: every fitness ranks each distinct genome once (a
    pick that is also a run's best counts once), and a run's re-ranked pick is the best by that
    fitness among its first `top` genomes, which come in the order of the run's own fitness."""
    from evaluators.config import DEV_TEXTS
    from experiments.dev_oracle import fresh_summary

    def candidate(source: str, genome: str, fitness: float, fresh: float, first: float, second: float) -> dict:
        return {"source": source, "chromosome": genome, "fitness": fitness, "scoring kl": fitness / 10,
                "fresh perplexity": fresh, "fresh kl": fresh / 10, DEV_TEXTS[0]: first, DEV_TEXTS[1]: second,
                "dev mean": (first + second) / 2}

    candidates = [candidate("pick ga-joint s0", "a", 1.0, 5.0, 10.0, 20.0),
                  candidate("run0 #1", "a", 1.0, 5.0, 10.0, 20.0),
                  candidate("run0 #2", "b", 2.0, 3.0, 8.0, 18.0),
                  candidate("run0 #3", "c", 3.0, 1.0, 30.0, 40.0),
                  candidate("run1 #1", "d", 1.5, 4.0, 12.0, 16.0),
                  candidate("run1 #2", "e", 2.5, 6.0, 11.0, 19.5)]
    summary = fresh_summary(candidates, top=2)
    assert summary["runs re-ranked"] == 2
    assert summary["re-ranked by fitness: dev mean of the picks"] == (15.0 + 14.0) / 2  # a and d
    assert summary["re-ranked by fresh perplexity: dev mean of the picks"] == (13.0 + 14.0) / 2  # b and d; c is third
    assert summary["re-ranked by fresh kl: dev mean of the picks"] == (13.0 + 14.0) / 2
    # over the five distinct genomes (a once): rho = 1 - 6 * sum of squared rank differences / (n (n^2 - 1))
    assert summary[f"spearman {DEV_TEXTS[0]} ~ {DEV_TEXTS[1]}"] == pytest.approx(1 - 6 * 14 / 120)
    assert summary["spearman fitness ~ dev mean"] == pytest.approx(1 - 6 * 8 / 120)


def test_a_rank_correlation_of_one_candidate_is_undefined_not_nan():
    from experiments.fidelity import spearman
    assert spearman([1.0], [2.0]) is None and spearman([1.0, 2.0], [3.0, 4.0]) == pytest.approx(1.0)
