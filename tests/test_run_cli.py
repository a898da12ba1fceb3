"""`python -m ga.run` end to end on a tiny model: kill it at any moment and it resumes exactly."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from ga.checkpoint import RunFolder

SETTINGS = ["--pop", "8", "--seq-len", "32", "--score-tokens", "1024", "--screen-tokens", "256", "--align-tokens", "64",
            "--repair-tokens", "256", "--batch-size", "8", "--workers", "local", "--no-progress"]
LONG = ["--patience", "0"]  # runs that must still be going when a signal arrives


def command(llama_dir, text_file, *extra):
    budget = [] if {"--remove", "--ratio"} & set(extra) else ["--remove", "2"]
    return [sys.executable, "-m", "ga.run", "--model", str(llama_dir), "--data", str(text_file), *SETTINGS, *budget,
            *extra]


def finished_state(folder):
    state = RunFolder(folder).load_checkpoint()["state"]
    fitnesses = {key: (value["perplexity"], value["nll"]) for key, value in state["cache"].items()}
    return state["population"], state["hall_of_fame"], state["logbook"], fitnesses, state["evaluations"]


def generation_of(folder):
    try:
        return json.loads((folder / "checkpoint.json").read_text())["state"]["generation"]
    except (FileNotFoundError, json.JSONDecodeError):
        return -1


def test_a_run_killed_at_any_moment_resumes_to_the_same_result(llama_dir, text_file, tmp_path):
    # Generations of this tiny search take milliseconds (most chromosomes come from the cache),
    # so the run is long and the kill lands soon after generation 2.
    subprocess.run(command(llama_dir, text_file, "--gens", "60", "--out", str(tmp_path / "whole"), *LONG), check=True)
    killed = subprocess.Popen(command(llama_dir, text_file, "--gens", "60", "--out", str(tmp_path / "killed"), *LONG))
    while generation_of(tmp_path / "killed") < 2:
        assert killed.poll() is None, "run ended before it could be killed"
        time.sleep(0.01)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.05))  # somewhere inside a later generation
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert generation_of(tmp_path / "killed") < 60
    resumed = subprocess.run(command(llama_dir, text_file, "--resume", str(tmp_path / "killed")),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert finished_state(tmp_path / "killed") == finished_state(tmp_path / "whole")
    assert json.loads((tmp_path / "killed" / "best.json").read_text())["genes"] == \
        json.loads((tmp_path / "whole" / "best.json").read_text())["genes"]


@pytest.mark.parametrize("signal_number, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_exits_cleanly_with_a_checkpoint_and_the_run_continues(llama_dir, text_file, tmp_path,
                                                                                 signal_number, status):
    # Once the cache answers most chromosomes a generation takes milliseconds: the run is made
    # far longer than the signal can take to arrive, or it may finish first on a busy machine.
    # Ctrl-C as a terminal sends it to a foreground job: a job started in the background (as under
    # nohup or `cmd &`) inherits SIGINT ignored, and so would the run.
    run = subprocess.Popen(command(llama_dir, text_file, "--gens", "100000", "--out", str(tmp_path / "int"), *LONG),
                           stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while generation_of(tmp_path / "int") < 1:
        time.sleep(0.01)
    run.send_signal(signal_number)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == status
    assert "--resume" in stderr and "Traceback" not in stderr
    stopped_at = generation_of(tmp_path / "int")
    assert 1 <= stopped_at < 100000
    more = subprocess.run(command(llama_dir, text_file, "--resume", str(tmp_path / "int"), "--gens",
                                  str(stopped_at + 2)), capture_output=True, text=True)
    assert more.returncode == 0, more.stderr
    assert generation_of(tmp_path / "int") == stopped_at + 2


def test_resume_with_other_settings_or_into_a_finished_run_is_refused_and_loses_nothing(llama_dir, text_file, tmp_path):
    subprocess.run(command(llama_dir, text_file, "--gens", "1", "--out", str(tmp_path / "r")), check=True)
    config_before = (tmp_path / "r" / "config.json").read_bytes()
    checkpoint_before = (tmp_path / "r" / "checkpoint.json").read_bytes()
    other = subprocess.run(command(llama_dir, text_file, "--resume", str(tmp_path / "r"), "--remove", "3"),
                           capture_output=True, text=True)
    assert other.returncode == 2 and "--remove 3 (run has 2)" in other.stderr
    finished = subprocess.run(command(llama_dir, text_file, "--resume", str(tmp_path / "r")),
                              capture_output=True, text=True)
    assert finished.returncode == 2 and "already finished 1 generations" in finished.stderr
    again = subprocess.run(command(llama_dir, text_file, "--gens", "1", "--out", str(tmp_path / "r")),
                           capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert (tmp_path / "r" / "config.json").read_bytes() == config_before
    assert (tmp_path / "r" / "checkpoint.json").read_bytes() == checkpoint_before


@pytest.mark.parametrize("extra, message", [
    (["--ratio", "1.5"], "ratio must lie strictly between 0 and 1"),
    (["--remove", "2", "--remove", "6"], "cannot remove 6 of 6 layers"),
    (["--model", "/no/such/model"], "neither a known id"),
    (["--data", "nonsense"], "unknown text 'nonsense'"),
    (["--offspring", "0"], "offspring must be a positive integer"),
    (["--screen-tokens", "16"], "--screen-tokens 16 must be at least one window (32 tokens)"),
    (["--repair", "magic"], "repair must be one of none, lsq"),
    (["--fitness", "bleu"], "fitness must be one of ppl, kl"),
    (["--patience", "-1"], "patience must not be negative"),
    (["--prescreen", "0"], "prescreen must be a positive integer"),
    (["--prescreen", "4", "--screen-tokens", "0"], "--prescreen chooses which candidates to screen"),
    (["--workers", "many"], "workers"),
    (["--workers", "auto", "--ray-address", "127.0.0.1:1"], "no Ray cluster answers at 127.0.0.1:1"),
    (["--gpus-per-worker", "0"], "gpus_per_worker must be a positive integer"),
    (["--chunk-timeout", "-5"], "chunk_timeout must be a number of seconds"),
    (["--align-method", "magic"], "align_method must be one of auto, hungarian, greedy"),
    (["--merge-cache-gb", "0"], "merge_cache_gb must be a positive number"),
    (["--align-tokens", "-1"], "align_tokens must not be negative"),
])
def test_bad_options_fail_with_a_message_naming_the_problem(llama_dir, text_file, tmp_path, extra, message):
    result = subprocess.run(command(llama_dir, text_file, "--gens", "1", "--out", str(tmp_path / "bad"), *extra),
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "bad").exists()  # nothing is left behind by a run that could not start


def test_help_documents_the_options():
    text = subprocess.run([sys.executable, "-m", "ga.run", "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("--model", "--data", "--seq-len", "--calib-steps", "--calib-batch", "--remove", "--ratio",
                   "--seed", "--workers", "--ray-address", "--out", "--resume", "--pop", "--offspring", "--gens", "--repair",
                   "--repair-tokens", "--repair-inputs", "--repair-ridge", "--fitness", "--patience",
                   "--gpus-per-worker", "--chunk-timeout", "--start-timeout", "--align-method", "--align-cache",
                   "--merge-cache-gb"):
        assert option in text, option


def test_a_run_stops_by_patience_and_summarizes_what_the_user_got(llama_dir, text_file, tmp_path):
    done = subprocess.run(command(llama_dir, text_file, "--gens", "500", "--patience", "3", "--out", str(tmp_path / "p")),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "stopped: no better chromosome in 3 generations (--patience 3)" in done.stdout
    assert "gaprune heal --chromosome" in done.stdout and "gaprune export --chromosome" in done.stdout
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert summary["generations"] < 500 and summary["layers"]["compact"] == 4
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["evaluator"]["align_cache"] == str(tmp_path / "p" / "alignments")
    merged = {key for key in RunFolder(tmp_path / "p").load_checkpoint()["state"]["cache"] if "2" in key}
    assert merged and len(list((tmp_path / "p" / "alignments").glob("*.safetensors"))) >= 1  # kept for a resume
    assert summary["decoder_parameters"]["compact"] < summary["decoder_parameters"]["dense"]
    assert summary["fitness"]["dense"]["perplexity"] > 1 and "dense" in done.stdout  # a random tiny model may lose to its cut
    assert summary["fitness"]["best"]["perplexity"] <= summary["fitness"]["seed"]["perplexity"]
    assert summary["fitness"]["repair"]["method"] == "lsq"
    assert (tmp_path / "p" / "summary.png").stat().st_size > 1000
    assert summary["compact"]["folder"] == str(tmp_path / "p" / "compact") and "compact model" in done.stdout
    assert (tmp_path / "p" / "compact" / "model.safetensors").is_file()


def test_kl_fitness_is_searched_and_recorded(llama_dir, text_file, tmp_path):
    done = subprocess.run(command(llama_dir, text_file, "--gens", "2", "--fitness", "kl", "--out", str(tmp_path / "kl")),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    best = json.loads((tmp_path / "kl" / "best.json").read_text())
    checkpoint = RunFolder(tmp_path / "kl").load_checkpoint()["state"]
    assert best["fitness"]["objective"] == "kl" and 0 < best["fitness"]["kl"]
    budgeted = [entry["kl"] for key, entry in checkpoint["cache"].items() if len(key) - key.count("1") == 2]
    assert best["fitness"]["kl"] == min(budgeted)  # (the cache also holds the single-layer seeding scans)
    assert checkpoint["logbook"][-1]["best"] == best["fitness"]["kl"]
