"""Could any search have done better than its pick? An oracle on dev text over what the searches
of `experiments.search_quality` scored.

For one budget: the best --top distinct genomes (by calibration fitness, full scorings only) of
every GA run under --work, and every method's pick (GA, EvoPress, one-shot: the per-run files),
each scored on the dev texts (the first --dev-tokens of each, 1,024-token windows), repaired as
the benchmark repairs them. Reported: each candidate's calibration fitness and dev perplexity,
the best candidate on dev against the picks, and how well calibration fitness ranks the
candidates by dev perplexity (Spearman). Dev text only: it chooses, test text is not read.

    python -m experiments.dev_oracle --data-dir ../shared/data --threads 2 --share 0.26667
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Sequence

from evaluators.config import DEV_TEXTS
from experiments.fidelity import spearman
from experiments.report import save_results
from ga.checkpoint import RunFolder
from gaprune.files import write_json_atomic


def ga_candidates(work: Path, share: float, top: int) -> list[dict[str, Any]]:
    """The best `top` distinct genomes fully scored in each GA run of this budget."""
    found = []
    for run in sorted((work / "runs").glob(f"ga-*-{share:.4f}-*")):
        scored = {key: fitness["perplexity"] for key, fitness in RunFolder(run).scored().items()}
        for rank, key in enumerate(sorted(scored, key=scored.get)[:top]):
            found.append({"source": f"{run.name} #{rank + 1}", "chromosome": key, "fitness": scored[key]})
    return found


def picks(work: Path, share: float) -> list[dict[str, Any]]:
    """Every method's pick at this budget, from its per-run file."""
    rows = [json.loads(path.read_text()) for path in sorted(work.glob(f"p{share:.4f}-*/*.json"))]
    return [{"source": f"pick {row['method']}" + ("" if row["seed"] is None else f" s{row['seed']}"),
             "chromosome": row["chromosome"], "fitness": row["fitness"], "repair": row.get("repair", "lsq"),
             **{name: row[name] for name in DEV_TEXTS if name in row}}  # measured there the same way
            for row in rows]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.dev_oracle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--share", type=float, default=0.26667, help="the budget, as search_quality names it")
    parser.add_argument("--top", type=int, default=5, help="genomes taken from each GA run")
    parser.add_argument("--work", default="runs/search_quality-joint", help="search_quality's --work")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--dev-tokens", type=int, default=16384, help="tokens of each dev text")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--output", default=None, help="stem under experiments/results (default: dev_oracle-p<share>)")
    args = parser.parse_args(argv)

    from evaluators.config import EvaluatorConfig
    from evaluators.fitness import ModelEvaluator
    from evaluators.text import text_blocks
    from chromosomes import from_string

    work = Path(args.work)
    candidates = [c for c in picks(work, args.share) if c["repair"] == "lsq"] + ga_candidates(work, args.share, args.top)
    evaluator = ModelEvaluator(EvaluatorConfig(data_dir=args.data_dir, threads=args.threads,
                                               align_cache=str(work / "store")))
    dev = {name: text_blocks(name, evaluator.tokenizer, 1024, args.dev_tokens, args.data_dir) for name in DEV_TEXTS}
    known = {c["chromosome"]: {name: c[name] for name in DEV_TEXTS} for c in candidates if DEV_TEXTS[0] in c}
    for candidate in candidates:  # each genome once, kept on disk for an interrupted run
        path = work / "dev" / f"{candidate['chromosome']}.json"
        if candidate["chromosome"] not in known:
            if not path.is_file():
                write_json_atomic(path, evaluator.heldout(from_string(candidate["chromosome"]), dev))
            known[candidate["chromosome"]] = json.loads(path.read_text())
        candidate.update(known[candidate["chromosome"]])
        candidate["dev mean"] = statistics.mean(candidate[name] for name in DEV_TEXTS)
        print(f"{candidate['source']:40s} fitness {candidate['fitness']:.3f} " +
              " ".join(f"{name} {candidate[name]:.2f}" for name in DEV_TEXTS), flush=True)
    best = min(candidates, key=lambda c: c["dev mean"])
    summary = {"candidates": len(candidates), "distinct": len({c["chromosome"] for c in candidates}),
               "best on dev": best["source"], "best dev mean": best["dev mean"],
               **{f"spearman fitness ~ {name}": spearman([c["fitness"] for c in candidates], [c[name] for c in candidates])
                  for name in DEV_TEXTS}}
    print(summary)
    columns = ["source", "fitness", *DEV_TEXTS, "dev mean"]
    save_results(args.output or f"dev_oracle-p{args.share:.4f}",
                 {"settings": vars(args), "summary": summary, "candidates": candidates},
                 sorted(candidates, key=lambda c: c["dev mean"]), columns)


if __name__ == "__main__":
    main()
