"""Search quality at equal budget, compared fairly: the GA on each space against one-shot and
evolutionary baselines.

Every method sees the same thing and pays the same way:
- the same budget: a share of the decoder parameters (--budgets; a depth method removes that
  share's whole layers, which must then be a whole number of them), and --evals fitness
  evaluations, a one-shot method's single-layer scans included, a screening counted as the share
  of scoring tokens it reads; the GA stops inside a generation rather than overshoot;
- the same repair: every cut repaired as `--repair` says before it is scored (narrowed sub-layers
  refitted, seams mapped), except the one row that shows the raw one-shot width plan;
- the same seeding: the GA and EvoPress of a space start from the same one-shot genome;
- 3 seeds per search method (one-shot methods are deterministic: one run);
- held-out figures of each chosen genome, repaired the same way: perplexity, KL from the dense
  model and top-1 agreement with it on the first 65,536 tokens (64 windows of 1,024) of
  WikiText-2 test and PTB test, perplexity on the first --dev-tokens of the dev texts, and its
  prefill and decode tokens/s against the dense model's (alternated, medians).
Setup statistics (repair, alignment, the units' ranking) are not counted for any method.

    python -m experiments.search_quality --data-dir ../shared/data --threads 2 --budgets 0.26667,0.4

Each finished (budget, method, seed) is kept under --work (default runs/<output>, and the
output is named after the ranking: search_quality-obs by default), so an interrupted benchmark
continues where it stopped, and the results hold exactly the runs made: a method not run is
absent. The folder keeps the evaluator settings it was started with and refuses a start with
others. `--reuse STEM` takes the runs of an earlier results file (rows as this code wrote them,
or as its earlier version did: budgets in layers) into --work first, so that new methods join
them without running them again; refused unless their fitness was measured the same way, and
a run left out where its method took something from a ranking other than this benchmark's (the
units a width keeps, or the widths of its one-shot seed).
Results: experiments/results/<output>.{json,csv,md,png}.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from chromosomes import Shape, Space, from_string, to_string
from chromosomes.width import counts_left, select_global
from evaluators.config import (DEV_TEXTS, EvaluatorConfig, FITNESS_KINDS, RANKINGS, REPAIRS, REPAIR_INPUTS, REPORT_TEXTS)
from evaluators.fitness import Fitness, ModelEvaluator
from evaluators.perplexity import final_hidden
from evaluators.surgery import layer_view
from evaluators.text import text_blocks
from experiments.report import RESULTS, save_results
from finetune.efficiency import PREFILL_TOKENS, decode, prefill, timed
from ga.baselines import evopress_search, random_search
from ga.checkpoint import RunFolder
from ga.config import SearchConfig
from ga.engine import evaluations_spent, evolve, width_seed
from ga.problem import Problem
from ga.run import RESUMABLE
from ga.seeding import single_skips, skip_lowest
from gaprune.files import write_json_atomic
from gaprune.options import add_config_arguments

LAYERS = 30
SPEED_ROUNDS = 3
HELDOUT_FIGURES = (*REPORT_TEXTS, *DEV_TEXTS, *(f"{text} {kind}" for text in REPORT_TEXTS for kind in ("kl", "top1")))
PHASES = (("prefill", prefill), ("decode", decode))  # what speed() times, in this order
SPEED_FIGURES = tuple(f"{phase} speedup" for phase, _ in PHASES)


class Remembering:
    """The evaluator with a memory: a genome another method (or seed) already scored is answered
    without recomputing it. Fitness is deterministic, so this changes no result; each method
    still counts every evaluation it asks for against its own budget."""

    def __init__(self, evaluator: ModelEvaluator):
        self.inner = evaluator
        self.num_layers = evaluator.num_layers
        self.config = evaluator.config
        self._known: dict[tuple[str, int | None], Fitness] = {}

    def evaluate(self, population: Sequence[Sequence[object]], tokens: int | None = None) -> list[Fitness]:
        keys = [(to_string(genes), tokens) for genes in population]
        new = list(dict.fromkeys(key for key in keys if key not in self._known))
        for key, fitness in zip(new, self.inner.evaluate([from_string(k) for k, _ in new], tokens) if new else []):
            self._known[key] = fitness
        return [self._known[key] for key in keys]

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()

    def block_influence(self) -> list[float]:
        return self.inner.block_influence()

    def units(self):
        return self.inner.units()


@dataclass
class Bench:
    """What every method shares: the budget, the evaluators (by repair and fitness kind), the seed."""

    args: argparse.Namespace
    share: float
    evaluators: Callable[..., Remembering]
    seed: int

    @property
    def removed(self) -> int:
        """The budget in whole layers (depth methods): refused unless it is a whole number of them."""
        layers = self.share * LAYERS
        if abs(layers - round(layers)) > 1e-3:
            raise SystemExit(f"budget {self.share} is {layers:.2f} layers: depth methods need a whole number")
        return round(layers)

    def evaluator(self, fitness: str | None = None, repair: str | None = None) -> Remembering:
        return self.evaluators(fitness or self.args.fitness, repair or self.args.repair)

    def problem(self, space: str, fitness: str | None = None) -> Problem:
        search = SearchConfig(space=space, params=self.share) if space != "layers" else SearchConfig(remove=self.removed)
        return Problem.of(search, self.evaluator(fitness).describe())

    def importance_seed(self, removed: int) -> tuple[list[int], int]:
        """The removal-importance chromosome of `removed` layers and what finding it cost (one
        evaluation per layer)."""
        singles = self.evaluator(self.args.depth_fitness).evaluate(single_skips(LAYERS))
        return skip_lowest([f.value for f in singles], removed), len(singles)


@dataclass(frozen=True)
class Method:
    """A row's way of choosing a genome, and what its result takes from the units' ranking:
    "order" where it narrows layers (which units a width keeps), "allocation" where only the
    one-shot plan's widths per layer seed it, None where nothing (so --reuse knows which rows of
    a benchmark ranked otherwise it may bring in)."""

    choose: Callable[[Bench], dict[str, Any]]
    takes: str | None = None


def ga_method(space: str, init: str | None = None, fitness: str | None = None, **settings: Any) -> Method:
    """The GA with ga.run's defaults for its space except patience (100 generations, so that it
    spends the whole budget as every other method does) and, if given, the seed, fitness and
    other search settings (named, so that a row keeps what it measured when a default changes)."""
    tag = "".join(f"-{key}{value}" for key, value in sorted(settings.items()))

    def search(bench: Bench) -> dict[str, Any]:
        a = bench.args
        budget = {"remove": bench.removed} if space == "layers" else {"space": space, "params": bench.share}
        config = SearchConfig(gens=10_000, **budget, init=init, max_evals=a.evals, seed=bench.seed, patience=100,
                              **settings)
        evaluator = bench.evaluator(fitness)
        name = f"ga-{space}-{bench.share:.4f}-{config.init}-s{bench.seed}{tag}"
        state = evolve(evaluator, config, RunFolder(Path(a.work) / "runs" / name), progress=False)
        genes, fitness_ = state.best()
        return {"genes": genes, "fitness": fitness_.value, "evaluations": evaluations_spent(
                state, config, evaluator.describe()), "generations": state.generation, "search": config.to_dict()}
    return Method(search, "order" if space == "joint" else "allocation" if init == "width" else None)


def influence_method(bench: Bench) -> dict[str, Any]:
    evaluator = bench.evaluator(bench.args.depth_fitness)
    genes = skip_lowest(evaluator.block_influence(), bench.removed)
    return {"genes": genes, "fitness": evaluator.evaluate([genes])[0].value, "evaluations": 1}


def importance_method(bench: Bench) -> dict[str, Any]:
    genes, cost = bench.importance_seed(bench.removed)
    return {"genes": genes, "fitness": bench.evaluator(bench.args.depth_fitness).evaluate([genes])[0].value,
            "evaluations": cost}


def random_method(bench: Bench) -> dict[str, Any]:
    found = random_search(bench.evaluator(bench.args.depth_fitness), bench.removed, bench.args.evals, seed=bench.seed,
                          merge=False)
    return {"genes": found.genes, "fitness": found.fitness.value, "evaluations": found.evaluations}


def evopress_method(start: str) -> Method:
    """EvoPress-style (1 + lambda) staged search over whole layers from a random chromosome or the
    importance seed (whose single-layer scans count in its budget)."""
    def search(bench: Bench) -> dict[str, Any]:
        a = bench.args
        parent, cost = bench.importance_seed(bench.removed) if start == "importance" else (None, 0)
        evaluator = bench.evaluator(a.depth_fitness)
        problem = Problem(Space("layers", bench.problem("joint").space.shape, merge=False), layers=bench.removed)
        found = evopress_search(evaluator, problem, a.evals - cost, seed=bench.seed,
                                full_tokens=evaluator.config.score_tokens, offspring=a.evopress_offspring,
                                survivors=a.evopress_survivors, screen_tokens=evaluator.config.seq_len, start=parent)
        return {"genes": found.genes, "fitness": found.fitness.value, "evaluations": found.evaluations + cost}
    return Method(search)


def evopress_joint(bench: Bench) -> dict[str, Any]:
    """EvoPress-style (1 + lambda) staged search on the joint space with its level-switch mutation,
    from the joint GA's own one-shot seed, under the same repair and budget."""
    a = bench.args
    evaluator = bench.evaluator()
    problem = bench.problem("joint")
    start = width_seed(evaluator, problem, random.Random(bench.seed))
    found = evopress_search(evaluator, problem, a.evals, seed=bench.seed, full_tokens=evaluator.config.score_tokens,
                            offspring=a.evopress_offspring, survivors=a.evopress_survivors,
                            screen_tokens=evaluator.config.seq_len, start=start)
    return {"genes": found.genes, "fitness": found.fitness.value, "evaluations": found.evaluations}


def width_plan(bench: Bench, units, shape: Shape, remove: int, layers: Sequence[int] | None = None) -> list[object]:
    """The one-shot global width plan at unit granularity: the units of least importance per
    parameter go (from `layers` alone, if given) until `remove` parameters are gone."""
    pool = [u for u in units if layers is None or u.layer in layers]
    removed = select_global(pool, remove)
    return [shape.gene(*counts) for counts in counts_left(units, removed, shape.num_layers)]


def oneshot_width(repair: str) -> Method:
    def oneshot(bench: Bench) -> dict[str, Any]:
        evaluator = bench.evaluator(repair=repair)
        shape = bench.problem("joint").space.shape
        budget = bench.problem("joint").budget
        genes = width_plan(bench, evaluator.units(), shape, budget.remove)
        return {"genes": genes, "fitness": evaluator.evaluate([genes])[0].value, "evaluations": 1, "repair": repair}
    return Method(oneshot, "order")


def depth_then_width(bench: Bench) -> dict[str, Any]:
    """Half the budget's layers by removal importance (one evaluation per layer), the rest of the
    budget by the global width plan over the layers left; repaired."""
    evaluator = bench.evaluator()
    problem = bench.problem("joint")
    shape = problem.space.shape
    depth, cost = bench.importance_seed(round(bench.share * LAYERS / 2))
    kept = [i for i, gene in enumerate(depth) if gene == 1]
    genes = width_plan(bench, evaluator.units(), shape, problem.budget.remove - (LAYERS - len(kept)) * shape.whole_layer,
                       kept)
    genes = [gene if i in kept else 0 for i, gene in enumerate(genes)]
    return {"genes": genes, "fitness": evaluator.evaluate([genes])[0].value, "evaluations": cost + 1}


ONE_SHOT: dict[str, Method] = {
    "shortgpt-bi": Method(influence_method),
    "removal-importance": Method(importance_method),
    "width-oneshot-raw": oneshot_width("none"),
    "width-oneshot": oneshot_width("lsq"),
    "depth-then-width": Method(depth_then_width, "order"),
}
# The joint space's selection before its own default (2 of 16 candidates fully scored per
# generation, tournaments of 8) was chosen: the rows measured with it keep it.
EARLIER_SELECTION = {"offspring": 4, "screen_factor": 4, "tournament": 3}
SEARCHES: dict[str, Method] = {
    "ga-joint": ga_method("joint"),
    "ga-joint-4of16-t3": ga_method("joint", **EARLIER_SELECTION),
    "ga-joint-2of16-t3": ga_method("joint", offspring=2, screen_factor=8, tournament=3),
    "ga-joint-prescreen4": ga_method("joint", prescreen=4),
    "ga-sublayers": ga_method("sublayers", "width"),
    "ga-sublayers-importance": ga_method("sublayers", "sublayers"),
    "evopress-joint": Method(evopress_joint, "order"),
    "ga-importance": ga_method("layers", "importance", fitness="ppl"),
    "evopress-importance": evopress_method("importance"),
    "random-search": Method(random_method),
    "ga-random": ga_method("layers", "random", fitness="ppl"),
    "evopress-random": evopress_method("random"),
}
METHODS = {**ONE_SHOT, **SEARCHES}


class HeldOut:
    """Held-out figures of a genome, measured once per genome, text and repair and kept on disk."""

    def __init__(self, bench_evaluators: Callable[..., Remembering], args: argparse.Namespace, work: Path):
        self.evaluators, self.args, self.work = bench_evaluators, args, work
        first = bench_evaluators(args.fitness, args.repair).inner
        tokenizer = first.tokenizer
        self.test = {name: text_blocks(name, tokenizer, 1024, args.heldout_tokens, args.data_dir) for name in REPORT_TEXTS}
        self.dev = {name: text_blocks(name, tokenizer, 1024, args.dev_tokens, args.data_dir) for name in DEV_TEXTS}
        self.references = {name: final_hidden(first.model, blocks, first.batch_size) for name, blocks in self.test.items()}
        self.prompt = self.test[REPORT_TEXTS[0]][:1]

    def measure(self, genes: Sequence[object], repair: str, recorded: dict[str, Any]) -> dict[str, Any]:
        """`recorded`: the run's file, whose figures stand where the cache lacks them (a run brought
        in by --reuse keeps its held-out figures rather than paying a quarter of an hour again)."""
        path = self.work / "heldout" / f"{to_string(genes)}-{repair}.json"
        known = json.loads(path.read_text()) if path.is_file() else recorded_figures(recorded)
        if not all(name in known for name in (*self.test, *self.dev)):
            evaluator = self.evaluators(self.args.fitness, repair).inner
            for name, value in evaluator.heldout(genes, self.test, self.references).items():
                known.update({name: value["perplexity"], f"{name} kl": value["kl"], f"{name} top1": value["top1"]})
            known.update(evaluator.heldout(genes, self.dev))
            write_json_atomic(path, known)
        if "speed" not in known or self.args.speed_again:
            known["speed"] = speed(self.evaluators(self.args.fitness, repair).inner, genes, self.prompt)
            write_json_atomic(path, known)
        return {key: value for key, value in known.items() if key != "speed"} | known["speed"]


def recorded_figures(run: dict[str, Any]) -> dict[str, Any]:
    """A run file's held-out figures in the cache's form (speed apart, as `speed` returns it)."""
    known = {name: run[name] for name in HELDOUT_FIGURES if name in run}
    if all(name in run for name in SPEED_FIGURES):
        known["speed"] = {name: run[name] for name in SPEED_FIGURES}
    return known


def speed(evaluator: ModelEvaluator, genes: Sequence[object], prompt: torch.Tensor) -> dict[str, float]:
    """Prefill and decode speed of the genome's layers against the dense model's: the very modules
    an export holds, run in place; a warm-up each, then dense and cut alternated, medians."""
    stack = evaluator.stack(genes)
    model = evaluator.model
    ids = prompt[:, :PREFILL_TOKENS].to(model.device)

    def run(name: str, phase) -> float:
        if name == "dense":
            return timed(phase, model, ids)[0]
        with layer_view(model, stack.modules, stack.layer_types):
            return timed(phase, model, ids)[0]

    for name in ("dense", "cut"):
        run(name, prefill)
    times: dict[str, dict[str, list[float]]] = {name: {phase: [] for phase, _ in PHASES} for name in ("dense", "cut")}
    for _ in range(SPEED_ROUNDS):
        for name in times:
            for phase, call in PHASES:
                times[name][phase].append(run(name, call))
    median = {name: {phase: statistics.median(values) for phase, values in phases.items()} for name, phases in times.items()}
    return {f"{phase} speedup": median["dense"][phase] / median["cut"][phase] for phase, _ in PHASES}


def run_method(bench: Bench, method: str, heldout: HeldOut, work: Path) -> dict[str, Any]:
    seed = bench.seed if method in SEARCHES else None
    path = work / f"p{bench.share:.4f}-{method}" / (f"s{seed}.json" if seed is not None else "one-shot.json")
    if path.is_file():
        result = json.loads(path.read_text())
    else:
        started = time.perf_counter()
        result = METHODS[method].choose(bench)
        result["search_seconds"] = time.perf_counter() - started
        result.update({"method": method, "share": bench.share, "seed": seed, "chromosome": to_string(result["genes"]),
                       "removed": round(bench.share * LAYERS, 4)})
        write_json_atomic(path, result)
    genes = from_string(result["chromosome"])
    shape = bench.problem("joint").space.shape
    result["removed share"] = shape.removed(genes) / shape.dense
    result.update(heldout.measure(genes, result.get("repair", bench.args.repair), result))
    write_json_atomic(path, result)
    print(f"{bench.share:.4f} {method:20s} seed {seed} {result['chromosome']} fitness {result['fitness']:.3f} "
          f"evals {result['evaluations']:.1f} " + " ".join(f"{k} {result[k]:.2f}" for k in (*REPORT_TEXTS, *DEV_TEXTS)),
          flush=True)
    return result


def row_config(base: EvaluatorConfig, repair: str, fitness: str | None = None) -> EvaluatorConfig:
    """The evaluator settings of the rows scored with this repair (a raw row of a benchmark
    ranked by obs cuts by what auto chooses there)."""
    return replace(base.with_repair(repair), fitness=fitness or base.fitness)


def ranking_taken(method: str, config: EvaluatorConfig) -> tuple[object, ...] | None:
    """What of the ranking (and of the refit it orders by) `method`'s result depends on under `config`."""
    use = METHODS[method].takes if method in METHODS else None
    if use is None:
        return None
    if use == "allocation":
        return config.importance, config.ranking_tokens
    return config.unit_ranking, config.ranking_tokens, config.refitted


def changed_settings(theirs: EvaluatorConfig, ours: EvaluatorConfig, also: frozenset[str] = frozenset()) -> list[str]:
    """The settings, other than those a run may resume with changed and `also`, on which two
    benchmarks' fitness differs."""
    their_settings = theirs.to_dict()
    return sorted(k for k, v in ours.to_dict().items() if k not in RESUMABLE | also and their_settings[k] != v)


def claim_work(work: Path, config: EvaluatorConfig) -> None:
    """A work folder holds one benchmark: its evaluator settings are kept there at the first start
    and a later start with others (a changed default among them) is refused, since its finished
    runs would otherwise join rows measured another way."""
    path = work / "evaluator.json"
    if not path.is_file():
        write_json_atomic(path, config.to_dict())
        return
    theirs = EvaluatorConfig.from_saved(json.loads(path.read_text()))
    changed = changed_settings(theirs, config, frozenset({"ranking"}))
    if theirs.unit_ranking != config.unit_ranking:
        changed.insert(0, f"ranking {theirs.unit_ranking} there, {config.unit_ranking} here")
    if changed:
        raise SystemExit(f"{work} holds a benchmark measured with other settings ({', '.join(changed)}): "
                         "give the same ones or another --work")


def reuse_runs(stem: str, work: Path, config: EvaluatorConfig) -> int:
    """Write the per-run files of an earlier results file into `work` (runs already there win);
    refused unless its fitness was measured as this benchmark's is, and a row left out where its
    method took from a ranking that differs from this benchmark's. Rows of the earlier version
    counted budgets in layers (`removed`): their share is that many of the 30."""
    earlier = json.loads((RESULTS / f"{stem}.json").read_text())
    theirs = EvaluatorConfig.from_saved(earlier["evaluator"])
    changed = changed_settings(theirs, config, frozenset({"ranking", "ranking_tokens", "refit"}))
    if changed:
        raise SystemExit(f"--reuse {stem}: its fitness was measured with other settings ({', '.join(changed)})")
    added = 0
    for row in earlier["rows"]:
        repair = row.get("repair", config.repair)
        if ranking_taken(row["method"], row_config(theirs, repair)) != ranking_taken(row["method"], row_config(config, repair)):
            continue
        share = row.get("share", row["removed"] / LAYERS)
        path = work / f"p{share:.4f}-{row['method']}" / ("one-shot.json" if row["seed"] is None else f"s{row['seed']}.json")
        if not path.is_file():
            write_json_atomic(path, {**row, "share": share})
            added += 1
    return added


def summarize(rows: list[dict[str, Any]], columns: Sequence[str]) -> list[dict[str, Any]]:
    """Per budget and method: mean and standard deviation over the seeds whose held-out figures
    were measured (a search interrupted before them counts once they are)."""
    out = []
    for share in sorted({r["share"] for r in rows}):
        for method in METHODS:
            runs = [r for r in rows if r["share"] == share and r["method"] == method and  # held-out measured
                    all(text in r for text in REPORT_TEXTS)]
            if not runs:
                continue
            entry: dict[str, Any] = {"share": share, "method": method, "runs": len(runs),
                                     "evaluations": max(r["evaluations"] for r in runs)}
            for key in columns:
                values = [r[key] for r in runs if r.get(key) is not None]
                if values:
                    entry[key] = statistics.mean(values)
                    entry[f"{key} sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
            out.append(entry)
    return out


def plot(summary: list[dict[str, Any]], texts: Sequence[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = sorted({r["share"] for r in summary})
    figure, axes = plt.subplots(1, len(shares), figsize=(7 * len(shares), 4.5), squeeze=False)
    for axis, share in zip(axes[0], shares):
        subset = [r for r in summary if r["share"] == share and all(t in r for t in texts)]
        xs = range(len(subset))
        width = 0.8 / len(texts)
        for i, text in enumerate(texts):
            axis.bar([x + (i - (len(texts) - 1) / 2) * width for x in xs], [r[text] for r in subset], width,
                     yerr=[r[f"{text} sd"] for r in subset], capsize=3, label=text)
        axis.set_xticks(list(xs), [r["method"] for r in subset], rotation=35, ha="right", fontsize=8)
        axis.set_title(f"{share:.1%} of decoder parameters removed (repaired; mean and sd over seeds)")
        axis.set_ylabel("test perplexity")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.search_quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--budgets", default="0.26667,0.4", help="shares of the decoder parameters, comma-separated")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"any of {', '.join(METHODS)}")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the search methods")
    parser.add_argument("--evals", type=int, default=80, help="fitness evaluations per method")
    parser.add_argument("--evopress-offspring", type=int, default=16)
    parser.add_argument("--evopress-survivors", type=int, default=2)
    parser.add_argument("--repair", default=EvaluatorConfig.repair, choices=REPAIRS)
    parser.add_argument("--repair-inputs", default=EvaluatorConfig.repair_inputs, choices=REPAIR_INPUTS)
    parser.add_argument("--repair-tokens", type=int, default=EvaluatorConfig.repair_tokens)
    parser.add_argument("--ranking", default=EvaluatorConfig.ranking, choices=RANKINGS,
                        help="ranking of the methods with widths (the raw rows rank obs's allocation, taylor2, without a refit)")
    parser.add_argument("--fitness", default=EvaluatorConfig.fitness, choices=FITNESS_KINDS,
                        help="fitness of the methods with widths")
    parser.add_argument("--depth-fitness", default="ppl", choices=FITNESS_KINDS,
                        help="fitness of the depth methods (their default, as the earlier comparison measured them)")
    parser.add_argument("--reuse", metavar="STEM", default=None,
                        help="take the runs of experiments/results/STEM.json into --work first")
    parser.add_argument("--heldout-tokens", type=int, default=65536, help="tokens of each test text")
    parser.add_argument("--dev-tokens", type=int, default=16384, help="tokens of each dev text")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--work", default=None,
                        help="per-run results and GA run folders, one benchmark's settings (default: runs/<output>)")
    parser.add_argument("--output", default=None, help="stem of the files under experiments/results "
                        "(default: search_quality-<the ranking used>, e.g. search_quality-obs)")
    parser.add_argument("--speed-again", action="store_true",
                        help="measure every run's speed again (its figures are kept): after runs made while the machine was busy")
    parser.add_argument("--collect", action="store_true", help="only gather the finished runs under --work into the results")
    add_config_arguments(parser, EvaluatorConfig, "where to run (float32 on a GPU measures what the CPU rows measure)",
                         only=("device", "dtype"))
    args = parser.parse_args(argv)
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        parser.error(f"unknown method(s): {', '.join(sorted(unknown))}")

    base = EvaluatorConfig(model=args.model, data_dir=args.data_dir, threads=args.threads, device=args.device,
                           dtype=args.dtype, repair=args.repair,
                           repair_inputs=args.repair_inputs, repair_tokens=args.repair_tokens, fitness=args.fitness,
                           ranking=args.ranking)
    args.output = args.output or f"search_quality-{base.unit_ranking}"
    args.work = args.work or f"runs/{args.output}"
    work = Path(args.work)
    base = replace(base, align_cache=str(work / "store"))
    claim_work(work, base)
    if args.reuse:
        print(f"took {reuse_runs(args.reuse, work, replace(base, fitness=args.depth_fitness))} runs from {args.reuse}",
              flush=True)
    if not args.collect:
        cache: dict[tuple[str, str], Remembering] = {}

        def evaluators(fitness: str, repair: str) -> Remembering:
            """One evaluator per (fitness, repair), all on the one model in memory."""
            if (fitness, repair) not in cache:
                loaded = next(iter(cache.values())).inner if cache else None
                cache[(fitness, repair)] = Remembering(ModelEvaluator(row_config(base, repair, fitness),
                                                                      loaded and (loaded.model, loaded.tokenizer)))
            return cache[(fitness, repair)]

        heldout = HeldOut(evaluators, args, work)
        for share in (float(b) for b in args.budgets.split(",")):
            for method in args.methods.split(","):
                seeds = [int(s) for s in args.seeds.split(",")] if method in SEARCHES else [0]
                for seed in seeds:
                    run_method(Bench(args, share, evaluators, seed), method, heldout, work)
    rows = [json.loads(path.read_text()) for path in sorted(work.glob("p*-*/*.json"))]
    rows = [r for r in rows if r["method"] in METHODS]
    rows.sort(key=lambda r: (r["share"], list(METHODS).index(r["method"]), r["seed"] or 0))
    figures = ["fitness", "removed share", *HELDOUT_FIGURES, *SPEED_FIGURES]
    summary = summarize(rows, figures)
    if not summary:
        raise SystemExit(f"no run under {work} has its held-out figures yet: nothing to report")
    columns = ["share", "method", "runs", "evaluations", *[c for f in figures for c in (f, f"{f} sd")]]
    settings = {k: v for k, v in vars(args).items() if k not in ("collect", "speed_again")}
    save_results(args.output, {"settings": settings, "evaluator": base.to_dict(), "rows": rows, "summary": summary},
                 summary, columns)
    plot(summary, REPORT_TEXTS, RESULTS / f"{args.output}.png")


if __name__ == "__main__":
    main()
