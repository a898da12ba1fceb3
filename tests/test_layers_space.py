"""`--space layers` is the depth search as it was before widths existed: the same fitness for the
same chromosomes, and a run folder saved then resumes exactly as it would have.

tests/data/layers_space holds what the code before widths wrote on the tiny Llama of
tests/tiny.py (seed 0) and the grammar text of the `text_file` fixture: fitness values of a few
chromosomes under each repair setting, a 3-generation run folder, and where that run stood after
being continued to generation 5.
"""
import json
import math
import shutil
from pathlib import Path

import pytest

from chromosomes import ChromosomeRecord, from_string
from evaluators.config import EvaluatorConfig
from evaluators.fitness import ModelEvaluator
from ga.run import main

DATA = Path(__file__).parent / "data" / "layers_space"
GOLDEN = json.loads((DATA / "fitness.json").read_text())
SETTINGS = dict(seq_len=32, score_tokens=1024, align_tokens=64, repair_tokens=256, batch_size=8)


def same(a: float, b: float) -> bool:
    """Equal up to the rounding of fp32 sums on a CPU with other vector units than the one that
    wrote the golden data (on one CPU, the code before widths and this code agree bit for bit)."""
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=0.0)


@pytest.mark.parametrize("setting", sorted(GOLDEN))
def test_depth_chromosomes_score_as_before_widths_existed(setting, llama_dir, text_file):
    golden = GOLDEN[setting]
    evaluator = ModelEvaluator(EvaluatorConfig(model=str(llama_dir), data=str(text_file), **SETTINGS,
                                               **golden["settings"]))
    chromosomes = list(golden["fitness"])
    scored = evaluator.evaluate([from_string(key) for key in chromosomes])
    for key, fitness in zip(chromosomes, scored):
        expected = golden["fitness"][key]
        assert same(fitness.perplexity, expected["perplexity"]), (key, fitness.perplexity, expected["perplexity"])
        assert (fitness.kl is None) == (expected["kl"] is None)
        if fitness.kl is not None:
            assert same(fitness.kl, expected["kl"])
    screened = evaluator.evaluate([from_string(key) for key in chromosomes], tokens=256)
    assert all(same(f.perplexity, golden["screen"][key]) for key, f in zip(chromosomes, screened))


def saved_run(tmp_path, llama_dir, text_file) -> Path:
    """The run folder as the code before widths left it, pointed at this session's model and text."""
    run = tmp_path / "run"
    shutil.copytree(DATA / "run", run)
    config = json.loads((run / "config.json").read_text())
    config["evaluator"].update(model=str(llama_dir), data=str(text_file), align_cache=str(run / "alignments"))
    (run / "config.json").write_text(json.dumps(config, indent=1))
    checkpoint = json.loads((run / "checkpoint.json").read_text())
    checkpoint["definition"]["model"] = str(llama_dir)
    checkpoint["definition"]["data"] = str(text_file)
    (run / "checkpoint.json").write_text(json.dumps(checkpoint, indent=1))
    return run


def test_a_run_saved_before_widths_existed_resumes_exactly(tmp_path, llama_dir, text_file):
    run = saved_run(tmp_path, llama_dir, text_file)
    ChromosomeRecord.load(run / "best.json", num_layers=6)  # its best.json still reads
    assert main(["--resume", str(run), "--gens", "5", "--no-progress"]) == 0
    state = json.loads((run / "checkpoint.json").read_text())["state"]
    expected = json.loads((DATA / "resumed_to_5.json").read_text())
    assert state["generation"] == expected["generation"] and state["evaluations"] == expected["evaluations"]
    assert [e["genes"] for e in state["population"]] == [e["genes"] for e in expected["population"]]
    assert [e["genes"] for e in state["hall_of_fame"]] == [e["genes"] for e in expected["hall_of_fame"]]
    fitness = {json.loads(line)["key"]: json.loads(line)["fitness"]["perplexity"]
               for line in (run / "evaluations.jsonl").read_text().splitlines() if not json.loads(line)["screen"]}
    assert fitness.keys() == expected["fitness"].keys()
    assert all(same(fitness[key], value) for key, value in expected["fitness"].items())
    saved = json.loads((run / "config.json").read_text())["search"]
    assert saved["space"] == "layers" and saved["remove"] == 2
