"""Would a regression on a run's own screenings have told which candidates to screen?

Replays finished GA runs from their checkpoints (every screening, in order): before each
generation's screenings, the ridge regression of `ga.surrogate` is fitted on every screening the
run had made so far and predicts that generation's; the table says how well it ordered them
(Spearman within the generation) and how often the generation's best screened genome was among
the quarter it ranked best (a prescreen of 4 keeps a quarter; chance is about a quarter). Only
calibration fitness is read: the runs' own screenings, no held-out text.

    python -m experiments.prescreen_study --run runs/BENCH/runs/ga-joint-* --ridge 1e-4,1e-3,1e-2,1
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy.stats import spearmanr

from chromosomes import Shape
from evaluators.fitness import Fitness
from experiments.report import save_results
from ga.checkpoint import RunFolder
from ga.problem import genome_shape
from ga.surrogate import predicted

EARLY = 13  # generations an 80-evaluation search of the joint space's default selection runs


def screenings_by_generation(checkpoint: dict[str, Any]) -> list[dict[str, Fitness]]:
    """Each generation's screenings, in the order the run made them: the checkpoint's screening
    cache split where each generation's logbook record says the run's screenings stood."""
    state = checkpoint["state"]
    screened = [(key, Fitness.from_dict(fitness)) for key, fitness in state["screen_cache"].items()]
    ends = [record["screenings"] for record in state["logbook"]]
    return [dict(screened[start:end]) for start, end in zip([0, *ends], ends)]


def replay(generations: list[dict[str, Fitness]], shape: Shape, ridge: float) -> list[dict[str, Any]]:
    """Per generation after the first: the regression's Spearman with what the screenings found,
    and whether the best of them was in its best quarter."""
    out = []
    for index, generation in enumerate(generations[1:], start=1):
        if len(generation) < 4:
            continue
        known = {key: fitness for earlier in generations[:index] for key, fitness in earlier.items()}
        keys = list(generation)
        guess = predicted(keys, known, shape, ridge)
        truth = [generation[key].value for key in keys]
        top = set(np.argsort(guess, kind="stable")[:len(keys) // 4])
        out.append({"generation": index, "spearman": float(spearmanr(guess, truth).statistic),
                    "best in top quarter": int(np.argmin(truth)) in top, "chance": (len(keys) // 4) / len(keys)})
    return out


def summary(run: str, ridge: str, replayed: list[dict[str, Any]], span: str) -> dict[str, Any]:
    return {"run": run, "ridge": ridge, "generations": span, "replayed": len(replayed),
            "spearman": statistics.mean(r["spearman"] for r in replayed),
            "best in top quarter": statistics.mean(float(r["best in top quarter"]) for r in replayed),
            "chance": statistics.mean(r["chance"] for r in replayed)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.prescreen_study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, nargs="+", help="finished GA run folders that screened")
    parser.add_argument("--ridge", default="1e-4,1e-3,1e-2,1", help="ridge strengths, comma-separated")
    parser.add_argument("--output", default="prescreen_study", help="stem under experiments/results")
    args = parser.parse_args(argv)

    ridges = args.ridge.split(",")  # kept as written: the table's two decimals would hide 1e-4
    per_run = []
    for run in (Path(r) for r in args.run):
        checkpoint = RunFolder(run).load_checkpoint()
        if checkpoint is None:
            raise SystemExit(f"{run} holds no finished generation")
        shape = genome_shape(checkpoint["definition"])
        generations = screenings_by_generation(checkpoint)
        for ridge in ridges:
            replayed = replay(generations, shape, float(ridge))
            per_run.append(summary(run.name, ridge, [r for r in replayed if r["generation"] <= EARLY], f"1-{EARLY}"))
            per_run.append(summary(run.name, ridge, replayed, "all"))
    means = []
    for ridge in ridges:
        for span in (f"1-{EARLY}", "all"):
            runs = [r for r in per_run if r["ridge"] == ridge and r["generations"] == span]
            means.append({"run": "mean of runs", "ridge": ridge, "generations": span,
                          "replayed": sum(r["replayed"] for r in runs),
                          **{key: statistics.mean(r[key] for r in runs) for key in ("spearman", "best in top quarter", "chance")}})
    rows = per_run + means
    for row in rows:
        print(" ".join(f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}"
                       for key, value in row.items()), flush=True)
    columns = ["run", "ridge", "generations", "replayed", "spearman", "best in top quarter", "chance"]
    save_results(args.output, {"settings": vars(args), "rows": rows}, rows, columns)


if __name__ == "__main__":
    main()
