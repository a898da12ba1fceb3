"""What a user waits for after a search: `gaprune export` of a pick (wall time of the command as a
user runs it, untrained and unmeasured by default), then loading the folder with `load_pruned`
and generating from it, and `gaprune evaluate` of the folder on the test texts.

    GAPRUNE_DATA_DIR=../shared/data python -m experiments.export_time --chromosome runs/<name>/best.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from experiments.report import save_results


def timed_command(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True)
    return time.perf_counter() - started


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.export_time", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chromosome", required=True, help="best.json of a search")
    parser.add_argument("--tokens", type=int, default=65536, help="tokens of each test text for evaluate")
    parser.add_argument("--output", default="export_time", help="stem of the files under experiments/results")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "compact"
        export_seconds = timed_command([sys.executable, "-m", "gaprune.cli", "export", "--chromosome", args.chromosome,
                                        "--out", str(folder), "--no-progress"])
        import torch
        from transformers import AutoTokenizer

        from evaluators.export import load_pruned
        started = time.perf_counter()
        model = load_pruned(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ids = tokenizer("The capital of France is", return_tensors="pt")
        with torch.no_grad():
            text = tokenizer.decode(model.generate(**ids, max_new_tokens=12, do_sample=False)[0])
        load_seconds = time.perf_counter() - started
        report = Path(scratch) / "evaluate.json"
        evaluate_seconds = timed_command([sys.executable, "-m", "gaprune.cli", "evaluate", "--folder", str(folder),
                                          "--tokens", str(args.tokens), "--json", str(report)])
        figures = json.loads(report.read_text())["figures"]
    row: dict[str, Any] = {"chromosome": args.chromosome, "export_seconds": export_seconds,
                           "load_and_generate_seconds": load_seconds, "evaluate_seconds": evaluate_seconds,
                           "generated": text,
                           **{f"{name} {key}": value for name, values in figures.items() for key, value in values.items()}}
    machine = {"cpus": os.cpu_count(), "data_dir": os.environ.get("GAPRUNE_DATA_DIR")}
    save_results(args.output, {"machine": machine, "run": row}, [row], list(row))
    print(row)


if __name__ == "__main__":
    main()
