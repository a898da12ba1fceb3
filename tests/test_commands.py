"""The front door and what every command shares: `gaprune <command>`, run files (--config,
--print-config) that round-trip, settings refused before torch loads, fast export, evaluate."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from gaprune.cli import COMMANDS
from gaprune.cli import main as gaprune
from gaprune.options import read_run_file
from tests.test_finetune import SKIP_ONLY, chromosome, options

SEARCH = ["--seq-len", "32", "--score-tokens", "256", "--screen-tokens", "64", "--repair-tokens", "256", "--pop", "4", "--batch-size", "8",
          "--workers", "local", "--no-progress", "--space", "layers", "--remove", "2"]


def printed(capsys, command, *argv) -> dict:
    assert gaprune([command, *argv, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def without_unset(sections: dict) -> dict:
    return {title: {k: v for k, v in values.items() if v is not None} for title, values in sections.items()}


def round_trip(capsys, tmp_path, command, *argv) -> None:
    """Printed settings, read back as a run file, print the same settings again."""
    first = printed(capsys, command, *argv)
    run_file = tmp_path / f"{command}.yaml"
    run_file.write_text(yaml.safe_dump(first))
    assert printed(capsys, command, "--config", str(run_file)) == first


@pytest.mark.parametrize("command", ["search", "export", "heal", "evaluate"])
def test_every_command_prints_settings_that_read_back_as_the_same_settings(command, llama_dir, text_file, tmp_path,
                                                                           capsys):
    best = chromosome(tmp_path, SKIP_ONLY, llama_dir, text_file)
    argv = {"search": ["--model", str(llama_dir), "--pop", "6", "--fitness", "kl", "--space", "joint"],
            "export": ["--chromosome", str(best), "--repair", "none"],
            "heal": ["--chromosome", str(best), "--plan", "wide", "--steps", "7", "--warmup", "1"],
            "evaluate": ["--chromosome", str(best), "--tokens", "2048", "--no-kl"]}[command]
    round_trip(capsys, tmp_path, command, *argv)
    settings = printed(capsys, command, *argv)
    flat = {k: v for section in settings.values() for k, v in section.items()}
    assert {"search": flat.get("pop") == 6 and flat.get("fitness") == "kl",
            "export": flat.get("steps") == 0 and flat.get("repair") == "none" and flat.get("measure") is False,
            "heal": flat.get("plan") == "wide" and flat.get("steps") == 7 and flat.get("measure") is True,
            "evaluate": flat.get("tokens") == 2048 and flat.get("kl") is False}[command]


def test_flags_typed_beside_a_run_file_win_and_toml_reads_too(llama_dir, tmp_path, capsys):
    run_file = tmp_path / "run.toml"
    run_file.write_text('[search]\npop = 12\nseed = 3\n[evaluator]\nfitness = "kl"\n')
    settings = printed(capsys, "search", "--model", str(llama_dir), "--config", str(run_file), "--seed", "5")
    assert settings["search"]["pop"] == 12 and settings["search"]["seed"] == 5
    assert settings["evaluator"]["fitness"] == "kl"


@pytest.mark.parametrize("text, message", [
    ("pop: 6\npopulation: 7\n", "unknown setting(s) population"),
    ("[1, 2]\n", "expected settings by name"),
    ("pop: [unclosed\n", "not valid YAML"),
    ("search: {pop: 6}\nruntime: {pop: 8}\n", "pop is set twice"),
    ("pop: 0\n", "pop must be a positive integer"),
])
def test_a_bad_run_file_is_refused_with_a_message_naming_the_problem(text, message, tmp_path, capsys):
    run_file = tmp_path / "bad.yaml"
    run_file.write_text(text)
    with pytest.raises(SystemExit) as failure:
        gaprune(["search", "--config", str(run_file), "--print-config"])
    assert failure.value.code == 2 and message in capsys.readouterr().err


def test_a_run_folders_saved_settings_are_a_valid_run_file(llama_dir, text_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert gaprune(["search", "--model", str(llama_dir), "--data", str(text_file), *SEARCH, "--gens", "1",
                    "--out", str(run)]) == 0
    capsys.readouterr()
    saved = json.loads((run / "config.json").read_text())
    again = printed(capsys, "search", "--config", str(run / "config.json"))
    assert again == without_unset(saved)
    assert read_run_file(run / "config.json")["remove"] == 2


def test_export_is_fast_by_default_and_its_folder_keeps_a_valid_run_file(llama_dir, text_file, tmp_path, capsys):
    best = chromosome(tmp_path, SKIP_ONLY, llama_dir, text_file)
    out = tmp_path / "compact"
    assert gaprune(["export", "--chromosome", str(best), "--out", str(out), "--data", str(text_file),
                    "--no-progress"]) == 0
    assert "not measured: add --measure" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["before"] == {} and report["efficiency"] is None and report["training"]["steps"] == 0
    again = printed(capsys, "export", "--config", str(out / "settings.json"))
    assert again == without_unset(json.loads((out / "settings.json").read_text()))
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"  # the model's own config
    assert gaprune(["export", "--chromosome", str(best), "--steps", "5"]) == 2
    assert "gaprune export sets --steps 0 itself" in capsys.readouterr().err


def test_evaluate_scores_a_chromosome_and_its_export_alike(llama_dir, text_file, held_out, tmp_path, capsys):
    best = chromosome(tmp_path, SKIP_ONLY, llama_dir, text_file)
    out = tmp_path / "compact"
    assert gaprune(["export", *options(best, out, text_file, held_out)]) == 0
    common = ["--texts", str(held_out), "--tokens", "1024", "--seq-len", "64", "--data-dir", str(tmp_path)]
    figures = {}
    for what in (["--chromosome", str(best)], ["--folder", str(out)]):
        report_file = tmp_path / f"{what[0][2:]}.json"
        assert gaprune(["evaluate", *what, *common, "--json", str(report_file)]) == 0
        figures[what[0]] = json.loads(report_file.read_text())["figures"][str(held_out)]
    printed_lines = capsys.readouterr().out
    assert "protocol: first windows of each text" in printed_lines and "top-1" in printed_lines
    chromosome_figures, folder_figures = figures["--chromosome"], figures["--folder"]
    assert folder_figures["perplexity"] == pytest.approx(chromosome_figures["perplexity"], rel=1e-5)
    assert 0 < folder_figures["kl"] and 0 < folder_figures["top1"] < 1
    dense = tmp_path / "dense.json"
    assert gaprune(["evaluate", "--chromosome", str(chromosome(tmp_path, (1,) * 6, llama_dir, text_file)),
                    *common, "--json", str(dense)]) == 0
    whole = json.loads(dense.read_text())["figures"][str(held_out)]
    assert whole["kl"] == pytest.approx(0, abs=1e-6) and whole["top1"] == 1


def test_the_front_door_lists_its_commands_and_refuses_an_unknown_one(capsys):
    assert gaprune(["--help"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in COMMANDS)
    assert gaprune(["prune"]) == 2 and "unknown command 'prune'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["search", "--pop", "0"], "pop must be a positive integer"),
    (["search", "--ratio", "1.5"], "ratio must lie strictly between 0 and 1"),
    (["heal", "--chromosome", "x.json", "--lr", "-1"], "lr must be a positive finite number"),
    (["evaluate", "--chromosome", "x.json", "--tokens", "0"], "tokens must be a positive integer"),
])
def test_a_wrong_setting_is_answered_before_torch_loads(argv, message):
    probe = ("import sys\nfrom gaprune.cli import main\ntry:\n    main(%r)\nexcept SystemExit as exit:\n"
             "    print(exit.code, 'torch' in sys.modules)\n" % argv)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "False"], result.stderr
    assert message in result.stderr


@pytest.mark.parametrize("command, argv", [("search", []), ("heal", ["--chromosome", "x.json"])])
def test_resume_and_out_must_name_the_same_folder_in_every_command(command, argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as failure:
        gaprune([command, *argv, "--resume", str(tmp_path / "a"), "--out", str(tmp_path / "b")])
    assert failure.value.code == 2
    assert f"--resume {tmp_path / 'a'} continues the run that writes that folder" in capsys.readouterr().err
