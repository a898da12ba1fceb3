"""Choosing the joint search's defaults on dev text: fitness kind, seed, MLP levels, ranking, refit.

Each variant is the GA of `ga.run` with its defaults but for the settings the variant names,
at one budget (a share of the decoder parameters), one seed and --evals evaluations (patience
100, so that every variant spends its budget); the one-shot global width plan is scored beside
them, with each ranking and with and without the refit. Every pick is measured on the dev texts
alone (WikiText-2 dev half, PTB validation): test text is never read here.

    python -m experiments.joint_defaults --data-dir ../shared/data --threads 2 \\
        --variants "base:;kl:fitness=kl;mix:init=mix;levels16:mlp_levels=16"

Finished variants are kept under --work (an interrupted run continues). Results:
experiments/results/<output>.{json,csv,md}.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Sequence

from chromosomes import ParameterBudget, Space, to_string
from chromosomes.width import counts_left, select_global
from evaluators.config import DEV_TEXTS, EvaluatorConfig
from evaluators.fitness import ModelEvaluator
from evaluators.text import text_blocks
from experiments.report import save_results
from ga.checkpoint import RunFolder
from ga.config import SearchConfig
from ga.engine import evaluations_spent, evolve
from gaprune.files import write_json_atomic

EVALUATOR_FIELDS = {f.name for f in fields(EvaluatorConfig)}


def parse_variants(text: str) -> dict[str, dict[str, Any]]:
    """"name:key=value,key=value;name2:..." -> {name: settings}; values are read as JSON where they can be."""
    variants = {}
    for part in filter(None, text.split(";")):
        name, _, assignments = part.partition(":")
        settings = {}
        for assignment in filter(None, assignments.split(",")):
            key, _, value = assignment.partition("=")
            try:
                settings[key] = json.loads(value)
            except json.JSONDecodeError:
                settings[key] = value
        variants[name] = settings
    return variants


class Evaluators:
    """One evaluator per set of evaluator settings, all on the one model in memory; besides the
    first, only the latest is kept (each holds gigabytes of repair statistics)."""

    def __init__(self, base: EvaluatorConfig):
        self.base = base
        self.cache: dict[str, ModelEvaluator] = {}

    def __call__(self, **settings: Any) -> ModelEvaluator:
        key = json.dumps(settings, sort_keys=True)
        if key not in self.cache:
            first = next(iter(self.cache.values()), None)
            for old in list(self.cache)[1:]:
                del self.cache[old]
            self.cache[key] = ModelEvaluator(replace(self.base, **settings), first and (first.model, first.tokenizer))
        return self.cache[key]


def run_variant(name: str, settings: dict[str, Any], args: argparse.Namespace, evaluators: Evaluators,
                dev: dict[str, Any], work: Path) -> dict[str, Any]:
    path = work / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    evaluator_settings = {k: v for k, v in settings.items() if k in EVALUATOR_FIELDS}
    search = SearchConfig(**{"gens": 10_000, "params": args.share, "max_evals": args.evals, "seed": args.seed,
                             "patience": 100, **{k: v for k, v in settings.items() if k not in EVALUATOR_FIELDS}})
    evaluator = evaluators(**evaluator_settings)
    started = time.perf_counter()
    state = evolve(evaluator, search, RunFolder(work / "runs" / name), progress=False)
    genes, fitness = state.best()
    result = {"variant": name, "settings": settings, "chromosome": to_string(genes), "fitness": fitness.value,
              "perplexity": fitness.perplexity, "kl": fitness.kl,
              "evaluations": evaluations_spent(state, search, evaluator.describe()),
              "generations": state.generation, "search_seconds": time.perf_counter() - started,
              **evaluator.heldout(genes, dev)}
    write_json_atomic(path, result)
    return result


def run_oneshot(ranking: str, refit: bool, args: argparse.Namespace, evaluators: Evaluators, dev: dict[str, Any],
                work: Path) -> dict[str, Any]:
    name = f"oneshot-{ranking}-{'refit' if refit else 'raw'}"
    path = work / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    evaluator = evaluators(ranking=ranking, **({} if refit else {"repair": "none"}))
    description = evaluator.describe()
    from chromosomes import Shape
    shape = Shape.from_dict(description["widths"]["shape"])
    budget = ParameterBudget.of(args.share, Space("joint", shape))
    units = evaluator.units()
    genes = [shape.gene(*c) for c in counts_left(units, select_global(units, budget.remove), shape.num_layers)]
    fitness = evaluator.evaluate([genes])[0]
    result = {"variant": name, "settings": {"ranking": ranking, "refit": refit}, "chromosome": to_string(genes),
              "fitness": fitness.value, "perplexity": fitness.perplexity, "kl": fitness.kl, "evaluations": 1,
              **evaluator.heldout(genes, dev)}
    write_json_atomic(path, result)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.joint_defaults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--share", type=float, default=0.26667, help="share of the decoder parameters removed")
    parser.add_argument("--variants", default="base:", help="name:key=value,...;name2:... (search or evaluator settings)")
    parser.add_argument("--oneshot", default="taylor2,taylor", help="rankings whose one-shot plan is scored, raw and refitted (obs: refitted only)")
    parser.add_argument("--evals", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dev-tokens", type=int, default=16384, help="tokens of each dev text")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--work", default="runs/joint_defaults")
    parser.add_argument("--output", default="joint_defaults-dev")
    args = parser.parse_args(argv)
    work = Path(args.work)
    evaluators = Evaluators(EvaluatorConfig(data_dir=args.data_dir, threads=args.threads,
                                            align_cache=str(work / "store")))
    tokenizer = evaluators().tokenizer
    dev = {name: text_blocks(name, tokenizer, 1024, args.dev_tokens, args.data_dir) for name in DEV_TEXTS}
    rankings = filter(None, args.oneshot.split(","))
    rows = [run_oneshot(ranking, refit, args, evaluators, dev, work)  # obs ranks by the refit: it has no raw plan
            for ranking in rankings for refit in ((True,) if ranking == "obs" else (False, True))]
    for row in rows:
        print(row["variant"], f"{row['fitness']:.3f}", *(f"{row[t]:.2f}" for t in DEV_TEXTS), flush=True)
    for name, settings in parse_variants(args.variants).items():
        row = run_variant(name, settings, args, evaluators, dev, work)
        print(row["variant"], f"{row['fitness']:.3f}", *(f"{row[t]:.2f}" for t in DEV_TEXTS), flush=True)
        rows.append(row)
    columns = ["variant", "fitness", "perplexity", "kl", *DEV_TEXTS, "evaluations", "generations", "search_seconds",
               "chromosome"]
    save_results(args.output, {"settings": vars(args), "evaluator": evaluators.base.to_dict(), "rows": rows},
                 rows, columns)


if __name__ == "__main__":
    main()
