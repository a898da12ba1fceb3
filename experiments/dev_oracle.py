"""Could any search have done better than its pick? An oracle on dev text over what the searches
of `experiments.search_quality` scored.

For one budget: the best --top distinct genomes (by calibration fitness, full scorings only) of
every GA run under --work, and every method's pick (GA, EvoPress, one-shot: the per-run files),
each scored on the dev texts (the first --dev-tokens of each, 1,024-token windows), repaired as
the benchmark repairs them. Reported: each candidate's calibration fitness and dev perplexity,
the best candidate on dev against the picks, and how well calibration fitness ranks the
candidates by dev perplexity (Spearman). Dev text only: it chooses, test text is not read.

With --fresh-windows N it also asks whether another fitness would rank these near-optimal genomes
better: each candidate is scored on N calibration windows no search read (after the scoring
windows and those the repair and ranking read), by perplexity and by KL from the dense model,
and by KL on the search's own scoring windows (what `--fitness kl` would have measured); for each GA run the pick a final re-ranking of its best genomes by that fitness would make
is compared on dev with the run's own pick. --match keeps the candidates whose source matches
(the spread of other spaces' genomes would make any fitness look good at ranking).

    python -m experiments.dev_oracle --data-dir ../shared/data --threads 2 --share 0.26667
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from evaluators.config import DEV_TEXTS, EvaluatorConfig
from experiments.fidelity import spearman
from experiments.report import RESULTS, save_results
from ga.checkpoint import RunFolder
from gaprune.files import write_json_atomic
from gaprune.options import add_config_arguments


def ga_candidates(work: Path, share: float, top: int) -> list[dict[str, Any]]:
    """The best `top` distinct genomes fully scored in each GA run of this budget."""
    found = []
    for run in sorted((work / "runs").glob(f"ga-*-{share:.4f}-*")):
        scored = {key: fitness["perplexity"] for key, fitness in RunFolder(run).scored().items()}
        for rank, key in enumerate(sorted(scored, key=scored.get)[:top]):
            found.append({"source": f"{run.name} #{rank + 1}", "chromosome": key, "fitness": scored[key]})
    return found


def picks(work: Path, share: float, same_dev: bool) -> list[dict[str, Any]]:
    """Every method's pick at this budget, from its per-run file, with the dev figures the
    benchmark measured where it read the same dev text (`same_dev`)."""
    rows = [json.loads(path.read_text()) for path in sorted(work.glob(f"p{share:.4f}-*/*.json"))]
    return [{"source": f"pick {row['method']}" + ("" if row["seed"] is None else f" s{row['seed']}"),
             "chromosome": row["chromosome"], "fitness": row["fitness"], "repair": row.get("repair", "lsq"),
             **{name: row[name] for name in DEV_TEXTS if name in row and same_dev}}
            for row in rows]


def dev_figures(evaluator: Any, key: str, dev: dict[str, Any], cache: Path | None) -> dict[str, float]:
    """A genome's dev perplexities, kept as cache/<tokens>-tokens/<key>.json when a cache folder is
    given, so an interrupted study resumes and the next study of the same genomes on as much dev
    text reads them back (and one on more text does not)."""
    from chromosomes import from_string
    tokens = max(blocks.numel() for blocks in dev.values())
    path = cache / f"{tokens}-tokens" / f"{key}.json" if cache is not None else None
    if path is not None and path.is_file():
        return json.loads(path.read_text())
    figures = evaluator.heldout(from_string(key), dev)
    if path is not None:
        write_json_atomic(path, figures)
    return figures


def fresh_blocks(evaluator: Any, config: EvaluatorConfig, windows: int) -> Any:
    """Calibration windows after every one a search reads (scoring, then alignment, repair, ranking)."""
    from evaluators.text import text_blocks
    used = evaluator.split.score.shape[0] + evaluator.split.tune.shape[0]
    blocks = text_blocks(config.data, evaluator.tokenizer, config.seq_len, data_dir=config.data_dir)
    if blocks.shape[0] < used + windows:
        raise SystemExit(f"{config.data} holds {blocks.shape[0]} windows: {used} are read by the search, "
                         f"{windows} more were asked for")
    return blocks[used:used + windows]


def score_fresh(evaluator: Any, config: EvaluatorConfig, candidates: list[dict[str, Any]], work: Path,
                windows: int) -> None:
    """Each candidate's KL on the scoring windows (`evaluator` measures KL fitness), and its
    perplexity and KL on the fresh calibration windows (one file per genome and measure under
    work, so an interrupted study resumes)."""
    from chromosomes import from_string
    from evaluators.perplexity import final_hidden
    blocks = fresh_blocks(evaluator, config, windows)
    reference = None
    for candidate in candidates:
        key = candidate["chromosome"]
        path = work / f"fresh-{windows}" / f"{key}.json"
        if not path.is_file():
            if reference is None:
                reference = final_hidden(evaluator.model, blocks, evaluator.batch_size)
            write_json_atomic(path, evaluator.heldout(from_string(key), {"fresh": blocks}, {"fresh": reference})["fresh"])
        path_kl = work / "scoring-kl" / f"{key}.json"
        if not path_kl.is_file():
            write_json_atomic(path_kl, evaluator.evaluate([from_string(key)])[0].to_dict())
        fresh, scoring = json.loads(path.read_text()), json.loads(path_kl.read_text())
        candidate["fresh perplexity"], candidate["fresh kl"], candidate["scoring kl"] = fresh["perplexity"], fresh["kl"], scoring["kl"]
        candidate["scoring perplexity"] = scoring["perplexity"]  # the search's fitness again: a check of the setup
        print(f"{candidate['source']:40s} scoring perplexity {scoring['perplexity']:.3f} kl {scoring['kl']:.4f}; "
              f"fresh perplexity {fresh['perplexity']:.3f} kl {fresh['kl']:.4f}", flush=True)


def fresh_summary(candidates: list[dict[str, Any]], top: int) -> dict[str, Any]:
    """How each fitness ranks the distinct candidates by dev perplexity (and how the dev texts
    rank them against each other: no one fitness can agree with two texts that disagree), and
    what re-ranking each GA run's best `top` genomes by it would have picked, against the run's
    own pick (dev mean, averaged)."""
    fitnesses = ("fitness", "scoring kl", "fresh perplexity", "fresh kl")
    distinct = list({c["chromosome"]: c for c in candidates}.values())
    first, second = DEV_TEXTS
    summary: dict[str, Any] = {f"spearman {first} ~ {second}": spearman([c[first] for c in distinct], [c[second] for c in distinct])}
    for kind in fitnesses:
        for name in (*DEV_TEXTS, "dev mean"):
            summary[f"spearman {kind} ~ {name}"] = spearman([c[kind] for c in distinct], [c[name] for c in distinct])
    runs: dict[str, list[dict[str, Any]]] = {}
    for candidate in candidates:
        if " #" in candidate["source"]:
            runs.setdefault(candidate["source"].split(" #")[0], []).append(candidate)
    for kind in fitnesses:
        chosen = [min(found[:top], key=lambda c: c[kind]) for found in runs.values()]
        summary[f"re-ranked by {kind}: dev mean of the picks"] = statistics.mean(c["dev mean"] for c in chosen)
    summary["runs re-ranked"] = len(runs)
    return summary


def benchmark_config(stem: str, work: Path, args: argparse.Namespace) -> tuple[EvaluatorConfig, bool]:
    """The benchmark's own evaluator settings (ranking, repair, refit: how its genomes are cut and
    repaired), scored by perplexity, or by KL where fresh windows are asked for; and whether its
    picks' dev figures read as much dev text as asked for now (else they are measured again)."""
    path = RESULTS / f"{stem}.json"
    if not path.is_file():
        raise SystemExit(f"--benchmark {stem}: no {path}; run experiments.search_quality --output {stem} first")
    results = json.loads(path.read_text())
    saved = EvaluatorConfig.from_saved(results["evaluator"])
    same_dev = results.get("settings", {}).get("dev_tokens") == args.dev_tokens
    return replace(saved, data_dir=args.data_dir, threads=args.threads, device=args.device,
                   align_cache=str(work / "store"), fitness="kl" if args.fresh_windows else "ppl"), same_dev


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.dev_oracle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--share", type=float, default=0.26667, help="the budget, as search_quality names it")
    parser.add_argument("--top", type=int, default=5, help="genomes taken from each GA run")
    parser.add_argument("--benchmark", default="search_quality-obs", metavar="STEM",
                        help="the search_quality results (experiments/results/STEM.json) whose runs are scored, "
                             "with its evaluator settings")
    parser.add_argument("--work", default=None, help="that benchmark's --work (default: runs/STEM)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--dev-tokens", type=int, default=16384, help="tokens of each dev text")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--match", default="", help="keep only candidates whose source matches this regular expression")
    parser.add_argument("--fresh-windows", type=int, default=0,
                        help="also score every candidate on this many calibration windows no search read (0: off)")
    parser.add_argument("--output", default=None, help="stem under experiments/results (default: dev_oracle-p<share>)")
    add_config_arguments(parser, EvaluatorConfig, "where to score (the benchmark's dtype is kept)", only=("device",))
    args = parser.parse_args(argv)

    from evaluators.fitness import ModelEvaluator
    from evaluators.text import text_blocks

    work = Path(args.work or f"runs/{args.benchmark}")
    config, same_dev = benchmark_config(args.benchmark, work, args)
    candidates = [c for c in picks(work, args.share, same_dev) if c["repair"] == config.repair] + ga_candidates(work, args.share, args.top)
    candidates = [c for c in candidates if re.search(args.match, c["source"])]
    evaluator = ModelEvaluator(config)
    dev = {name: text_blocks(name, evaluator.tokenizer, 1024, args.dev_tokens, args.data_dir) for name in DEV_TEXTS}
    known = {c["chromosome"]: {name: c[name] for name in DEV_TEXTS} for c in candidates if DEV_TEXTS[0] in c}
    for candidate in candidates:  # each genome once, kept on disk for an interrupted run
        if candidate["chromosome"] not in known:
            known[candidate["chromosome"]] = dev_figures(evaluator, candidate["chromosome"], dev, work / "dev")
        candidate.update(known[candidate["chromosome"]])
        candidate["dev mean"] = statistics.mean(candidate[name] for name in DEV_TEXTS)
        print(f"{candidate['source']:40s} fitness {candidate['fitness']:.3f} " +
              " ".join(f"{name} {candidate[name]:.2f}" for name in DEV_TEXTS), flush=True)
    best = min(candidates, key=lambda c: c["dev mean"])
    summary = {"candidates": len(candidates), "distinct": len({c["chromosome"] for c in candidates}),
               "best on dev": best["source"], "best dev mean": best["dev mean"],
               **{f"spearman fitness ~ {name}": spearman([c["fitness"] for c in candidates], [c[name] for c in candidates])
                  for name in DEV_TEXTS}}
    columns = ["source", "fitness", *DEV_TEXTS, "dev mean"]
    if args.fresh_windows:
        score_fresh(evaluator, config, candidates, work, args.fresh_windows)
        summary |= fresh_summary(candidates, args.top)
        columns[2:2] = ["scoring kl", "fresh perplexity", "fresh kl"]
    print(summary)
    save_results(args.output or f"dev_oracle-p{args.share:.4f}",
                 {"settings": vars(args), "summary": summary, "candidates": candidates},
                 sorted(candidates, key=lambda c: c["dev mean"]), columns)


if __name__ == "__main__":
    main()
