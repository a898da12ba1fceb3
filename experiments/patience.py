"""Where would a finished run have stopped under another --patience, and what would that pick be
worth on dev text?

A seeded search follows the same path whatever its patience (patience only decides when it
stops), so a run that went to its last generation answers this for every smaller patience: the
run stops at the first generation whose best is `patience` generations old, and picks the best
chromosome of that generation. Each such pick is scored on the dev texts (the first
--dev-tokens of each, 1,024-token windows) with the run's own evaluator settings (its repair,
ranking and alignments): dev text chooses the default, test text is not read.

    python -m experiments.patience --run runs/main-command-20261202-233655 --data-dir ../shared/data
"""
from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from evaluators.config import DEV_TEXTS
from experiments.report import save_results
from ga.engine import generations_without_progress


def stopping_generation(bests: Sequence[float], patience: int) -> int:
    """The generation at which a run with these per-generation bests stops under `patience`
    (its last generation if patience never ends it)."""
    for generation in range(len(bests)):
        if patience and generations_without_progress(bests[:generation + 1]) >= patience:
            return generation
    return len(bests) - 1


def read_generations(run: Path) -> list[dict[str, Any]]:
    """Each generation's logbook record with the best chromosome found by then."""
    lines = (run / "generations.jsonl").read_text().splitlines()
    return [{**entry["logbook"], "chromosome": entry["history"]["best"]} for entry in map(json.loads, lines)]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.patience", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a GA run folder that ran to its last generation")
    parser.add_argument("--patience", default="3,5,6,8,10", help="values of --patience to replay, comma-separated")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--dev-tokens", type=int, default=16384, help="tokens of each dev text")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--output", default="patience", help="stem under experiments/results")
    args = parser.parse_args(argv)

    from chromosomes import from_string
    from evaluators.config import EvaluatorConfig
    from evaluators.fitness import ModelEvaluator
    from evaluators.text import text_blocks

    run = Path(args.run)
    generations = read_generations(run)
    bests = [g["best"] for g in generations]
    saved = EvaluatorConfig.from_saved(json.loads((run / "config.json").read_text())["evaluator"])
    evaluator = ModelEvaluator(replace(saved, data_dir=args.data_dir or saved.data_dir, threads=args.threads))
    dev = {name: text_blocks(name, evaluator.tokenizer, 1024, args.dev_tokens, args.data_dir) for name in DEV_TEXTS}
    measured: dict[str, dict[str, float]] = {}
    rows = []
    for patience in (int(p) for p in args.patience.split(",")):
        stop = generations[stopping_generation(bests, patience)]
        if stop["chromosome"] not in measured:
            measured[stop["chromosome"]] = evaluator.heldout(from_string(stop["chromosome"]), dev)
        figures = measured[stop["chromosome"]]
        rows.append({"patience": patience, "stops at generation": stop["gen"], "evaluations": stop["total_evals"],
                     "share of the run's evaluations": stop["total_evals"] / generations[-1]["total_evals"],
                     "fitness": stop["best"], **figures, "dev mean": statistics.mean(figures.values()),
                     "chromosome": stop["chromosome"]})
        print({k: v for k, v in rows[-1].items() if k != "chromosome"}, flush=True)
    columns = ["patience", "stops at generation", "evaluations", "share of the run's evaluations", "fitness",
               *DEV_TEXTS, "dev mean"]
    save_results(args.output, {"settings": vars(args), "run": str(run), "rows": rows}, rows, columns)


if __name__ == "__main__":
    main()
