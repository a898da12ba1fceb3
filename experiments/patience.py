"""Where would finished runs have stopped under another --patience or --gens, and what would
those picks be worth on dev text?

A seeded search follows the same path whatever its patience and generation cap (they only decide
when it stops), so a run that went further answers this for every smaller patience and cap: the
run stops at the first generation whose best is `patience` generations old, or at generation
`gens`, and picks the best chromosome of that generation. Each such pick is scored on the dev
texts (the first --dev-tokens of each, 1,024-token windows) with the runs' own evaluator settings
(their repair, ranking and alignments): dev text chooses the default, test text is not read.
Several runs (seeds, budgets) are compared by how far each stop's dev mean lies from the run's
own last generation's.

    python -m experiments.patience --run runs/main-command-20261202-233655 --data-dir ../shared/data
    python -m experiments.patience --run runs/BENCH/runs/ga-joint-* --evaluator runs/BENCH/evaluator.json \
        --work runs/BENCH --gens 50,0 --patience 5,10,20,0 --output patience-joint
"""
from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from evaluators.config import DEV_TEXTS, EvaluatorConfig
from experiments.dev_oracle import dev_figures
from experiments.report import save_results
from ga.checkpoint import RunFolder
from ga.config import SearchConfig
from ga.engine import generations_without_progress, screening_share
from gaprune.options import add_config_arguments


def stopping_generation(bests: Sequence[float], patience: int, gens: int = 0) -> int:
    """The generation at which a run with these per-generation bests stops under `patience` and
    the cap `gens` (0: none; its last generation if neither ends it)."""
    last = len(bests) - 1 if not gens else min(gens, len(bests) - 1)
    for generation in range(last + 1):
        if patience and generations_without_progress(bests[:generation + 1]) >= patience:
            return generation
    return last


def read_generations(run: Path) -> list[dict[str, Any]]:
    """Each generation's logbook record with the best chromosome found by then."""
    lines = (run / "generations.jsonl").read_text().splitlines()
    return [{**entry["logbook"], "chromosome": entry["history"]["best"]} for entry in map(json.loads, lines)]


def evaluations_by_generation(run: Path, generations: list[dict[str, Any]]) -> list[float]:
    """What the run had spent by each generation, counted as its --max-evals counts (a screening
    as the share of the scoring tokens it reads)."""
    checkpoint = RunFolder(run).load_checkpoint()
    share = screening_share(SearchConfig.from_dict(checkpoint["search"]), checkpoint["definition"])
    return [g["total_evals"] + g.get("screenings", 0) * share for g in generations]


def run_settings(run: Path, evaluator_file: str | None) -> dict[str, Any]:
    """The evaluator settings a run was scored with: its own config.json (a ga.run folder), or the
    file given (a benchmark's GA runs keep theirs in the benchmark's work folder)."""
    if evaluator_file:
        return json.loads(Path(evaluator_file).read_text())
    path = run / "config.json"
    if not path.is_file():
        raise SystemExit(f"{run} has no config.json: give the settings it was scored with as --evaluator FILE")
    return json.loads(path.read_text())["evaluator"]


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (gens, patience): means over the runs, the dev mean as its distance from each run's end."""
    stops: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for row in rows:
        stops.setdefault((row["gens"], row["patience"]), []).append(row)
    return [{"gens": gens, "patience": patience, "runs": len(group),
             **{name: statistics.mean(r[name] for r in group)
                for name in ("stops at generation", "evaluations", "share of the run's evaluations")},
             "dev mean vs the run's end %": statistics.mean(r["dev mean vs the run's end %"] for r in group),
             "worst run %": max(r["dev mean vs the run's end %"] for r in group)}
            for (gens, patience), group in stops.items()]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.patience", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, nargs="+", help="GA run folders that ran past the stops replayed")
    parser.add_argument("--patience", default="3,5,6,8,10",
                        help="values of --patience to replay, comma-separated (0: none)")
    parser.add_argument("--gens", default="0",
                        help="values of --gens to replay, comma-separated (0: each run's length)")
    parser.add_argument("--evaluator", default=None, metavar="FILE",
                        help="the runs' evaluator settings (default: each run's config.json)")
    parser.add_argument("--work", default=None,
                        help="keep each genome's dev figures in WORK/dev (dev_oracle's cache), so a rerun resumes")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--dev-tokens", type=int, default=16384, help="tokens of each dev text")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--output", default="patience", help="stem under experiments/results")
    add_config_arguments(parser, EvaluatorConfig, "where to score (the runs' dtype is kept)", only=("device",))
    args = parser.parse_args(argv)

    from evaluators.fitness import ModelEvaluator
    from evaluators.text import text_blocks

    runs = [Path(run) for run in args.run]
    saved = EvaluatorConfig.from_saved(run_settings(runs[0], args.evaluator))
    if any(EvaluatorConfig.from_saved(run_settings(run, args.evaluator)) != saved for run in runs[1:]):
        raise SystemExit("the runs were scored with different evaluator settings: replay them separately")
    store = str(Path(args.work) / "store") if args.work else saved.align_cache
    evaluator = ModelEvaluator(replace(saved, data_dir=args.data_dir or saved.data_dir, threads=args.threads,
                                       device=args.device, align_cache=store))
    dev = {name: text_blocks(name, evaluator.tokenizer, 1024, args.dev_tokens, args.data_dir) for name in DEV_TEXTS}
    measured: dict[str, dict[str, float]] = {}
    cache = Path(args.work) / "dev" if args.work else None

    def dev_of(key: str) -> dict[str, float]:
        """A genome's dev perplexities, scored once (and kept under --work)."""
        if key not in measured:
            measured[key] = dev_figures(evaluator, key, dev, cache)
        return measured[key]

    rows = []
    for run in runs:
        generations = read_generations(run)
        bests = [g["best"] for g in generations]
        spent = evaluations_by_generation(run, generations)
        end = statistics.mean(dev_of(generations[-1]["chromosome"]).values())
        for gens in (int(g) for g in args.gens.split(",")):
            for patience in (int(p) for p in args.patience.split(",")):
                at = stopping_generation(bests, patience, gens)
                stop = generations[at]
                figures = dev_of(stop["chromosome"])
                mean = statistics.mean(figures.values())
                rows.append({"run": run.name, "gens": gens, "patience": patience, "stops at generation": stop["gen"],
                             "evaluations": spent[at], "share of the run's evaluations": spent[at] / spent[-1],
                             "fitness": stop["best"], **figures,
                             "dev mean": mean, "dev mean vs the run's end %": 100 * (mean / end - 1),
                             "chromosome": stop["chromosome"]})
                print({k: v for k, v in rows[-1].items() if k != "chromosome"}, flush=True)
    summary = summarize(rows)
    columns = ["gens", "patience", "runs", "stops at generation", "evaluations", "share of the run's evaluations",
               "dev mean vs the run's end %", "worst run %"]
    save_results(args.output, {"settings": vars(args), "rows": rows, "summary": summary}, summary, columns)


if __name__ == "__main__":
    main()
