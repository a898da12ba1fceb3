"""Search quality at equal budget: our GA against one-shot and evolutionary baselines.

Same model, same number of removed layers, same calibration text and the same number of
fitness evaluations for every search method. Each method's chromosome is then measured on
held-out text (WikiText-2 and PTB test), as it is and after the same RMSNorm calibration.

    python -m experiments.search_quality --data-dir ../shared/data --threads 1

Fitness is measured as ga.run measures it by default (4,096 tokens in 1,024-token windows).
Results: experiments/results/search_quality-4k.{json,csv,md,png}. Each finished (budget, method)
is kept under --work, so an interrupted benchmark continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from chromosomes import budget, to_string, write_json_atomic
from evaluators.calibration import calibrated_norms
from evaluators.fitness import EvaluatorConfig, ModelEvaluator
from evaluators.perplexity import perplexity
from evaluators.surgery import layer_view
from evaluators.text import CALIBRATION_TEXT, REPORT_TEXTS, text_blocks
from experiments.report import RESULTS, save_results
from ga.baselines import evopress_search, random_search
from ga.checkpoint import RunFolder
from ga.config import INITS, SearchConfig
from ga.engine import evaluations_spent, evolve
from ga.seeding import single_skips, skip_lowest


@dataclass
class Bench:
    """What every method shares: the budget, the evaluators (plain and calibrated) and settings."""

    args: argparse.Namespace
    removed: int
    plain: ModelEvaluator
    calibrated: ModelEvaluator

    def evaluator(self, calibrate: bool) -> ModelEvaluator:
        return self.calibrated if calibrate else self.plain


def ga_method(merge: bool, calibrate: bool, screened: bool = False) -> Callable[[Bench], dict[str, Any]]:
    """A GA variant; `screened` runs a small population that screens --screen-factor offspring
    per place on --screen-tokens and fully scores only the best (EvoPress's staged selection)."""
    def search(bench: Bench) -> dict[str, Any]:
        a = bench.args
        staging = {"pop": a.screen_pop, "screen_tokens": a.screen_tokens or a.seq_len,
                   "screen_factor": a.screen_factor} if screened else {"pop": a.pop}
        config = SearchConfig(gens=10_000, remove=bench.removed, merge=merge, init=a.init, max_evals=a.evals,
                              seed=a.seed, **staging)
        variant = f"{'merge' if merge else 'skip'}{'-calib' if calibrate else ''}{'-screened' if screened else ''}"
        name = f"ga-r{bench.removed}-{variant}-s{a.seed}"
        evaluator = bench.evaluator(calibrate)
        state = evolve(evaluator, config, RunFolder(Path(a.work) / name), progress=False)
        genes, fitness = state.best()
        spent = evaluations_spent(state, config, evaluator.describe())
        return {"genes": genes, "fitness": fitness.perplexity, "evaluations": round(spent, 1),
                "screenings": state.screenings, "generations": state.generation}
    return search


def influence_method(bench: Bench) -> dict[str, Any]:
    influence = bench.plain.block_influence()
    genes = skip_lowest(influence, bench.removed)
    return {"genes": genes, "fitness": bench.plain.evaluate([genes])[0].perplexity, "evaluations": 1,
            "block_influence": influence}


def removal_method(bench: Bench) -> dict[str, Any]:
    singles = bench.plain.evaluate(single_skips(bench.plain.num_layers))
    genes = skip_lowest([f.perplexity for f in singles], bench.removed)
    return {"genes": genes, "fitness": bench.plain.evaluate([genes])[0].perplexity,
            "evaluations": len(singles) + 1, "single_skip_perplexity": [f.perplexity for f in singles]}


def random_method(bench: Bench) -> dict[str, Any]:
    found = random_search(bench.plain, bench.removed, bench.args.evals, seed=bench.args.seed, merge=False)
    return {"genes": found.genes, "fitness": found.fitness.perplexity, "evaluations": found.evaluations}


def evopress_method(bench: Bench) -> dict[str, Any]:
    a = bench.args
    found = evopress_search(bench.plain, bench.removed, a.evals, seed=a.seed, full_tokens=a.score_tokens,
                            offspring=a.evopress_offspring, survivors=a.evopress_survivors,
                            screen_tokens=a.seq_len, merge=False)
    return {"genes": found.genes, "fitness": found.fitness.perplexity, "evaluations": found.evaluations}


METHODS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "shortgpt-bi": influence_method,
    "removal-importance": removal_method,
    "random-search": random_method,
    "evopress": evopress_method,
    "ga-skip": ga_method(merge=False, calibrate=False),
    "ga-merge": ga_method(merge=True, calibrate=False),
    "ga-skip-calib": ga_method(merge=False, calibrate=True),
    "ga-merge-calib": ga_method(merge=True, calibrate=True),
    "ga-skip-screened": ga_method(merge=False, calibrate=False, screened=True),
}


def heldout(bench: Bench, genes: Sequence[int], blocks: dict[str, Any]) -> dict[str, float]:
    """Held-out perplexity of the chromosome, as it is and after RMSNorm calibration on calibration text."""
    evaluator = bench.calibrated
    stack = evaluator.stack(genes)
    c = evaluator.config
    out: dict[str, float] = {}
    with layer_view(evaluator.model, stack.modules, stack.layer_types):
        for name, text in blocks.items():
            out[name] = perplexity(evaluator.model, text, batch_size=c.batch_size)[0]
        with calibrated_norms(evaluator.model, stack.modules, evaluator.split.tune, c.calib_steps, c.calib_batch,
                              c.calib_lr):
            for name, text in blocks.items():
                out[f"{name} calib"] = perplexity(evaluator.model, text, batch_size=c.batch_size)[0]
    return out


def run_method(bench: Bench, method: str, blocks: dict[str, Any], work: Path) -> dict[str, Any]:
    path = work / f"r{bench.removed}-{method}-s{bench.args.seed}.json"
    if path.is_file():
        return json.loads(path.read_text())
    started = time.perf_counter()
    result = METHODS[method](bench)
    result["search_seconds"] = time.perf_counter() - started
    result.update(heldout(bench, result["genes"], blocks))
    result.update({"method": method, "removed": bench.removed, "chromosome": to_string(result["genes"])})
    write_json_atomic(path, result)
    print(f"r{bench.removed} {method:20s} {result['chromosome']} fitness {result['fitness']:.3f} "
          + " ".join(f"{k} {v:.2f}" for k, v in result.items() if k in blocks or k.endswith(" calib")), flush=True)
    return result


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["removed"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    figure, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4.5), squeeze=False)
    for axis, removed in zip(axes[0], budgets):
        subset = {r["method"]: r for r in rows if r["removed"] == removed}
        shown = [m for m in methods if m in subset]  # a method not run at this budget is left out
        xs = range(len(shown))
        width = 0.38
        axis.bar([x - width / 2 for x in xs], [subset[m]["wikitext2:test"] for m in shown], width, label="WikiText-2")
        axis.bar([x + width / 2 for x in xs], [subset[m]["ptb:test"] for m in shown], width, label="PTB")
        axis.set_yscale("log")
        axis.set_xticks(list(xs), shown, rotation=40, ha="right", fontsize=8)
        axis.set_title(f"{removed} layers removed")
        axis.set_ylabel("held-out perplexity (no healing)")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.search_quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--ratios", default="0.25,0.4", help="fractions of layers removed, comma-separated")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"any of {', '.join(METHODS)}")
    parser.add_argument("--evals", type=int, default=80, help="fitness evaluations per search method")
    parser.add_argument("--pop", type=int, default=16)
    parser.add_argument("--init", default=SearchConfig.init, choices=INITS, help="GA initial population")
    parser.add_argument("--screen-pop", type=int, default=6, help="population of the screened GA")
    parser.add_argument("--screen-factor", type=int, default=4, help="offspring the screened GA screens per place")
    parser.add_argument("--screen-tokens", type=int, default=0, help="screening tokens of the screened GA (0: one window)")
    parser.add_argument("--evopress-offspring", type=int, default=16)
    parser.add_argument("--evopress-survivors", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=EvaluatorConfig.seq_len, help="fitness window (ga.run's default)")
    parser.add_argument("--score-tokens", type=int, default=EvaluatorConfig.score_tokens, help="fitness tokens (ga.run's default)")
    parser.add_argument("--calib-steps", type=int, default=2)
    parser.add_argument("--eval-seq-len", type=int, default=1024)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="runs/search_quality-4k", help="per-method results and GA run folders")
    parser.add_argument("--output", default="search_quality-4k", help="stem of the files under experiments/results")
    args = parser.parse_args(argv)
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        parser.error(f"unknown method(s): {', '.join(sorted(unknown))}")

    config = EvaluatorConfig(model=args.model, data=CALIBRATION_TEXT, data_dir=args.data_dir, seq_len=args.seq_len,
                             score_tokens=args.score_tokens, threads=args.threads)
    plain = ModelEvaluator(config)
    calibrated = ModelEvaluator(EvaluatorConfig(**{**config.to_dict(), "calib_steps": args.calib_steps}))
    blocks = {name: text_blocks(name, plain.tokenizer, args.eval_seq_len, args.eval_tokens, args.data_dir)
              for name in REPORT_TEXTS}
    work = Path(args.work)
    rows = []
    for ratio in (float(r) for r in args.ratios.split(",")):
        bench = Bench(args, budget(plain.num_layers, ratio=ratio), plain, calibrated)
        for method in args.methods.split(","):
            rows.append(run_method(bench, method, blocks, work))
    columns = ["removed", "method", "evaluations", "fitness", "wikitext2:test", "ptb:test", "wikitext2:test calib",
               "ptb:test calib", "search_seconds", "chromosome"]
    save_results(args.output, {"settings": vars(args), "evaluator": config.to_dict(), "rows": rows}, rows, columns)
    plot(rows, RESULTS / f"{args.output}.png")


if __name__ == "__main__":
    main()
