"""The README's main command as a newcomer runs it: wall time, the wait before its first line of
output, why it stopped, and what it found, taken from the run's own summary.json.

The command is read from the README (the first `python -m ga.run` line of its set-up block),
so that what is measured is what users are told to run; it runs in a fresh run folder under
--out with the environment this process has.

    GAPRUNE_DATA_DIR=../shared/data python -m experiments.main_command
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from experiments.report import save_results

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_command() -> list[str]:
    """The arguments of the README's main command (`python -m ga.run ...`, in its set-up block)."""
    found = re.search(r"python -m ga\.run([^\n`&|]*)", README.read_text())
    if found is None:
        raise SystemExit(f"error: {README} shows no `python -m ga.run` command")
    return shlex.split(found.group(1))


def run_timed(command: list[str]) -> tuple[int, float, float, str]:
    """Run the command; return its exit status, wall seconds, seconds to its first output, and its stdout."""
    started = time.perf_counter()
    first: list[float] = []
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)

    def watch_stderr() -> None:  # progress bars and phase lines go to stderr
        assert process.stderr is not None
        while chunk := process.stderr.read(1):
            if not first:
                first.append(time.perf_counter() - started)
            sys.stderr.write(chunk)

    watcher = threading.Thread(target=watch_stderr, daemon=True)
    watcher.start()
    assert process.stdout is not None
    output = []
    for line in process.stdout:
        if not first:
            first.append(time.perf_counter() - started)
        output.append(line)
        sys.stdout.write(line)
    status = process.wait()
    watcher.join()
    return status, time.perf_counter() - started, first[0] if first else float("nan"), "".join(output)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.main_command", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs", help="folder that gets the run folder (main-command-<time>)")
    parser.add_argument("--output", default="main_command", help="stem of the files under experiments/results")
    args = parser.parse_args(argv)

    name = time.strftime("main-command-%Y%m%d-%H%M%S")
    arguments = readme_command()
    command = [sys.executable, "-m", "ga.run", *arguments, "--out", str(Path(args.out) / name)]
    status, seconds, first_output, stdout = run_timed(command)
    if status != 0:
        raise SystemExit(f"error: the main command exited with status {status}")
    summary: dict[str, Any] = json.loads((Path(args.out) / name / "summary.json").read_text())
    fitness = summary["fitness"]
    row = {
        "command": " ".join(["python -m ga.run", *arguments]),
        "wall_seconds": seconds, "first_output_seconds": first_output,
        "stopped_because": summary["stopped_because"], "generations": summary["generations"],
        "evaluations": summary["evaluations"], "best": summary["best"],
        "best_perplexity": fitness["best"]["perplexity"],
        "seed_perplexity": None if fitness["seed"] is None else fitness["seed"]["perplexity"],
        "dense_perplexity": fitness["dense"]["perplexity"],
        "removed_share_of_decoder": summary["decoder_parameters"]["removed_share"],
    }
    machine = {"cpus": os.cpu_count(), "data_dir": os.environ.get("GAPRUNE_DATA_DIR")}
    save_results(args.output, {"machine": machine, "run": row, "summary": summary, "printed": stdout}, [row],
                 list(row))


if __name__ == "__main__":
    main()
