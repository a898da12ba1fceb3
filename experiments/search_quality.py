"""Search quality at equal budget, compared fairly: our GA against one-shot and evolutionary baselines.

Every method sees the same thing and pays the same way:
- the same fitness: ga.run's default (perplexity on 4,096 calibration tokens in 1,024-token
  windows, every chromosome seam-repaired as `--repair` says before it is scored), so a
  repaired baseline is the bar to beat, never a raw one;
- the same budget, counted the same way: --evals fitness evaluations, a one-shot method's
  single-layer scans included, a screening counted as the share of scoring tokens it reads;
  the GA stops inside a generation rather than overshoot;
- the same seeding choices: the GA and EvoPress each start from the removal-importance seed
  and from random chromosomes;
- 3 seeds per search method (one-shot methods are deterministic: one run);
- held-out perplexity of each chosen chromosome, repaired the same way, on the first 65,536
  tokens (64 windows of 1,024) of WikiText-2 test and PTB test; and on the first --dev-tokens
  of the dev texts, which say whether a better fitness carries over to unseen text without
  looking at test.

    python -m experiments.search_quality --data-dir ../shared/data --threads 1 --budgets 8

Each finished (budget, method, seed) is kept under --work, so an interrupted benchmark
continues where it stopped, and the results hold exactly the runs made: a method not run is
absent. `--reuse STEM` takes the runs of an earlier results file (rows as this code wrote them)
into --work first, so that new methods, seeds or budgets join them without running them again.
Results: experiments/results/<output>.{json,csv,md,png}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from chromosomes import from_string, to_string, write_json_atomic
from evaluators.fitness import FITNESS_KINDS, EvaluatorConfig, Fitness, ModelEvaluator
from evaluators.repair import REPAIR_INPUTS, REPAIRS
from evaluators.text import DEV_TEXTS, REPORT_TEXTS, text_blocks
from experiments.report import RESULTS, save_results
from ga.baselines import evopress_search, random_search
from ga.checkpoint import RunFolder
from ga.config import SearchConfig
from ga.engine import evaluations_spent, evolve
from ga.run import RESUMABLE
from ga.seeding import single_skips, skip_lowest


class Remembering:
    """The evaluator with a memory: a chromosome another method (or seed) already scored is
    answered without recomputing it. Fitness is deterministic, so this changes no result; each
    method still counts every evaluation it asks for against its own budget."""

    def __init__(self, evaluator: ModelEvaluator):
        self.inner = evaluator
        self.num_layers = evaluator.num_layers
        self.config = evaluator.config
        self._known: dict[tuple[str, int | None], Fitness] = {}

    def evaluate(self, population: Sequence[Sequence[int]], tokens: int | None = None) -> list[Fitness]:
        keys = [(to_string(genes), tokens) for genes in population]
        new = list(dict.fromkeys(key for key in keys if key not in self._known))
        for key, fitness in zip(new, self.inner.evaluate([from_string(k) for k, _ in new], tokens) if new else []):
            self._known[key] = fitness
        return [self._known[key] for key in keys]

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()

    def block_influence(self) -> list[float]:
        return self.inner.block_influence()


@dataclass
class Bench:
    """What every method shares: the budget, the one evaluator, the settings, the seed."""

    args: argparse.Namespace
    removed: int
    evaluator: Remembering
    seed: int

    def importance_seed(self) -> tuple[list[int], int]:
        """The removal-importance chromosome and what finding it cost (one evaluation per layer)."""
        singles = self.evaluator.evaluate(single_skips(self.evaluator.num_layers))
        return skip_lowest([f.value for f in singles], self.removed), len(singles)


Method = Callable[[Bench], dict[str, Any]]


def ga_method(init: str, merge: bool = True) -> Method:
    """The GA with ga.run's defaults except patience (100 generations, so that it spends the
    whole budget as every other method does; the bound only matters for a model so small that
    the GA runs out of new chromosomes)."""
    def search(bench: Bench) -> dict[str, Any]:
        a = bench.args
        config = SearchConfig(gens=10_000, remove=bench.removed, merge=merge, init=init, max_evals=a.evals,
                              seed=bench.seed, patience=100)
        name = f"ga-r{bench.removed}-{init}-{'merge' if merge else 'skip'}-s{bench.seed}"
        state = evolve(bench.evaluator, config, RunFolder(Path(a.work) / name), progress=False)
        genes, fitness = state.best()
        return {"genes": genes, "fitness": fitness.value, "evaluations": evaluations_spent(
                state, config, bench.evaluator.describe()), "generations": state.generation,
                "search": config.to_dict()}
    return search


def influence_method(bench: Bench) -> dict[str, Any]:
    genes = skip_lowest(bench.evaluator.block_influence(), bench.removed)
    return {"genes": genes, "fitness": bench.evaluator.evaluate([genes])[0].value, "evaluations": 1}


def importance_method(bench: Bench) -> dict[str, Any]:
    genes, cost = bench.importance_seed()
    return {"genes": genes, "fitness": bench.evaluator.evaluate([genes])[0].value, "evaluations": cost}


def random_method(bench: Bench) -> dict[str, Any]:
    found = random_search(bench.evaluator, bench.removed, bench.args.evals, seed=bench.seed, merge=False)
    return {"genes": found.genes, "fitness": found.fitness.value, "evaluations": found.evaluations}


def evopress_method(start: str) -> Method:
    """EvoPress-style (1 + lambda) staged search from a random chromosome or the importance seed
    (whose single-layer scans count in its budget)."""
    def search(bench: Bench) -> dict[str, Any]:
        a = bench.args
        parent, cost = bench.importance_seed() if start == "importance" else (None, 0)
        found = evopress_search(bench.evaluator, bench.removed, a.evals - cost, seed=bench.seed,
                                full_tokens=bench.evaluator.config.score_tokens, offspring=a.evopress_offspring,
                                survivors=a.evopress_survivors, screen_tokens=bench.evaluator.config.seq_len,
                                merge=False, start=parent)
        return {"genes": found.genes, "fitness": found.fitness.value, "evaluations": found.evaluations + cost}
    return search


ONE_SHOT: dict[str, Method] = {
    "shortgpt-bi": influence_method,
    "removal-importance": importance_method,
}
SEARCHES: dict[str, Method] = {
    "ga-importance": ga_method("importance"),
    "evopress-importance": evopress_method("importance"),
    "random-search": random_method,
    "ga-random": ga_method("random"),
    "evopress-random": evopress_method("random"),
}
METHODS = {**ONE_SHOT, **SEARCHES}


def heldout(evaluator: Remembering, genes: Sequence[int], texts: dict[str, Any], work: Path) -> dict[str, float]:
    """Held-out perplexity of the repaired chromosome, measured once per chromosome and text and kept."""
    path = work / "heldout" / f"{to_string(genes)}.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    missing = {name: blocks for name, blocks in texts.items() if name not in known}
    if missing:
        known.update(evaluator.inner.heldout(genes, missing))
        write_json_atomic(path, known)
    return {name: known[name] for name in texts}


def run_method(bench: Bench, method: str, texts: dict[str, Any], work: Path) -> dict[str, Any]:
    seed = bench.seed if method in SEARCHES else None
    path = work / f"r{bench.removed}-{method}" / (f"s{seed}.json" if seed is not None else "one-shot.json")
    if path.is_file():
        result = json.loads(path.read_text())
        if all(name in result for name in texts):
            return result
        result.update(heldout(bench.evaluator, result["genes"], texts, work))  # a text added since
        write_json_atomic(path, result)
        return result
    started = time.perf_counter()
    result = METHODS[method](bench)
    result["search_seconds"] = time.perf_counter() - started
    result.update(heldout(bench.evaluator, result["genes"], texts, work))
    result.update({"method": method, "removed": bench.removed, "seed": seed, "chromosome": to_string(result["genes"])})
    write_json_atomic(path, result)
    print(f"r{bench.removed} {method:20s} seed {seed} {result['chromosome']} fitness {result['fitness']:.3f} "
          f"evals {result['evaluations']:.1f} " + " ".join(f"{k} {result[k]:.2f}" for k in texts), flush=True)
    return result


def reuse_runs(stem: str, work: Path, config: EvaluatorConfig) -> int:
    """Write the per-run files of an earlier results file into `work` (runs already there win);
    refused unless its fitness was measured as this benchmark's is."""
    earlier = json.loads((RESULTS / f"{stem}.json").read_text())
    theirs = EvaluatorConfig.from_dict(earlier["evaluator"]).to_dict()  # settings added since: their defaults
    changed = sorted(k for k, v in config.to_dict().items() if k not in RESUMABLE and theirs[k] != v)
    if changed:
        raise SystemExit(f"--reuse {stem}: its fitness was measured with other settings ({', '.join(changed)})")
    added = 0
    for row in earlier["rows"]:
        path = work / f"r{row['removed']}-{row['method']}" / (
            "one-shot.json" if row["seed"] is None else f"s{row['seed']}.json")
        if not path.is_file():
            write_json_atomic(path, row)
            added += 1
    return added


def summarize(rows: list[dict[str, Any]], texts: Sequence[str]) -> list[dict[str, Any]]:
    """Per budget and method: mean, standard deviation, min and max over seeds."""
    out = []
    for removed in sorted({r["removed"] for r in rows}):
        for method in METHODS:
            runs = [r for r in rows if r["removed"] == removed and r["method"] == method]
            if not runs:
                continue
            entry: dict[str, Any] = {"removed": removed, "method": method, "runs": len(runs),
                                     "evaluations": max(r["evaluations"] for r in runs)}
            for key in ("fitness", *texts):
                values = [r[key] for r in runs]
                entry[key] = statistics.mean(values)
                entry[f"{key} sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
                entry[f"{key} range"] = f"{min(values):.2f}-{max(values):.2f}"
            out.append(entry)
    return out


def plot(summary: list[dict[str, Any]], texts: Sequence[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["removed"] for r in summary})
    figure, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4.5), squeeze=False)
    for axis, removed in zip(axes[0], budgets):
        subset = [r for r in summary if r["removed"] == removed]
        xs = range(len(subset))
        width = 0.8 / len(texts)
        for i, text in enumerate(texts):
            axis.bar([x + (i - (len(texts) - 1) / 2) * width for x in xs], [r[text] for r in subset], width,
                     yerr=[r[f"{text} sd"] for r in subset], capsize=3, label=text)
        axis.set_xticks(list(xs), [r["method"] for r in subset], rotation=35, ha="right", fontsize=8)
        axis.set_title(f"{removed} of 30 layers removed (repaired, mean and sd over seeds)")
        axis.set_ylabel("held-out perplexity")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.search_quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--budgets", default="8,12", help="layers removed, comma-separated")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"any of {', '.join(METHODS)}")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the search methods")
    parser.add_argument("--evals", type=int, default=80, help="fitness evaluations per method")
    parser.add_argument("--evopress-offspring", type=int, default=16)
    parser.add_argument("--evopress-survivors", type=int, default=2)
    parser.add_argument("--repair", default=EvaluatorConfig.repair, choices=REPAIRS)
    parser.add_argument("--repair-inputs", default=EvaluatorConfig.repair_inputs, choices=REPAIR_INPUTS)
    parser.add_argument("--repair-tokens", type=int, default=EvaluatorConfig.repair_tokens)
    parser.add_argument("--fitness", default=EvaluatorConfig.fitness, choices=FITNESS_KINDS)
    parser.add_argument("--reuse", metavar="STEM", default=None,
                        help="take the runs of experiments/results/STEM.json into --work first")
    parser.add_argument("--heldout-tokens", type=int, default=65536, help="tokens of each test text")
    parser.add_argument("--dev-tokens", type=int, default=16384, help="tokens of each dev text")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--work", default="runs/search_quality-repaired", help="per-run results and GA run folders")
    parser.add_argument("--output", default="search_quality-repaired", help="stem of the files under experiments/results")
    parser.add_argument("--collect", action="store_true", help="only gather the finished runs under --work into the results")
    args = parser.parse_args(argv)
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        parser.error(f"unknown method(s): {', '.join(sorted(unknown))}")

    config = EvaluatorConfig(model=args.model, data_dir=args.data_dir, threads=args.threads, repair=args.repair,
                             repair_inputs=args.repair_inputs, repair_tokens=args.repair_tokens,
                             fitness=args.fitness)
    work = Path(args.work)
    if args.reuse:
        print(f"took {reuse_runs(args.reuse, work, config)} runs from {args.reuse}", flush=True)
    if not args.collect:
        evaluator = Remembering(ModelEvaluator(config))
        tokenizer = evaluator.inner.tokenizer
        texts = {**{name: text_blocks(name, tokenizer, 1024, args.heldout_tokens, args.data_dir) for name in REPORT_TEXTS},
                 **{name: text_blocks(name, tokenizer, 1024, args.dev_tokens, args.data_dir) for name in DEV_TEXTS}}
        for removed in (int(b) for b in args.budgets.split(",")):
            for method in args.methods.split(","):
                seeds = [int(s) for s in args.seeds.split(",")] if method in SEARCHES else [0]
                for seed in seeds:
                    run_method(Bench(args, removed, evaluator, seed), method, texts, work)
    rows = [json.loads(path.read_text()) for path in sorted(work.glob("r*-*/*.json"))]
    rows.sort(key=lambda r: (r["removed"], list(METHODS).index(r["method"]), r["seed"] or 0))
    held_out = REPORT_TEXTS + DEV_TEXTS
    summary = summarize(rows, held_out)
    columns = ["removed", "method", "runs", "evaluations", "fitness", *[c for t in held_out for c in
                                                                        (t, f"{t} sd", f"{t} range")]]
    settings = {k: v for k, v in vars(args).items() if k != "collect"}
    save_results(args.output, {"settings": settings, "evaluator": config.to_dict(), "rows": rows,
                               "summary": summary}, summary, columns)
    plot(summary, REPORT_TEXTS, RESULTS / f"{args.output}.png")


if __name__ == "__main__":
    main()
