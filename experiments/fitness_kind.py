"""Which fitness ranks candidates the way dev text does: perplexity or KL from the dense model?

EvoPress minimises the KL divergence of the pruned model's next-token distribution from the
dense model's; gaprune's default is calibration perplexity. Choosing between them is choosing
a default, so it is done on dev text: this takes the candidates of an `experiments.fidelity`
study (the best chromosomes of GA runs and the other methods' picks, each already measured on
the dev texts, as that study's results file holds them), scores every one under today's default
protocol (4,096 calibration tokens, seam repair) with both fitness kinds in the same pass, and
reports each kind's Spearman rank correlation with dev perplexity and the dev perplexity of the
chromosome it would have picked.

    python -m experiments.fitness_kind --candidates fidelity-dev-r12 --data-dir ../shared/data --threads 1
"""
from __future__ import annotations

import argparse
import json
from typing import Sequence

import numpy as np

from chromosomes import from_string
from evaluators.config import DEV_TEXTS, EvaluatorConfig
from evaluators.fitness import ModelEvaluator
from experiments.fidelity import spearman
from experiments.report import RESULTS, save_results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.fitness_kind", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", required=True,
                        help="stem of an experiments.fidelity results file (experiments/results/STEM.json)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--output", default=None, help="stem of the files written (default: fitness_kind-<candidates>)")
    args = parser.parse_args(argv)
    source = RESULTS / f"{args.candidates}.json"
    if not source.is_file():
        raise SystemExit(f"no results file {source}: run experiments.fidelity first")
    study = json.loads(source.read_text())
    measured = study["measured"]
    model, data = study["evaluator"]["model"], study["evaluator"]["data"]
    config = EvaluatorConfig(model=model, data=data, data_dir=args.data_dir, threads=args.threads, fitness="kl")
    scores = ModelEvaluator(config).evaluate([from_string(m["chromosome"]) for m in measured])
    fitness = {"ppl": [s.perplexity for s in scores], "kl": [s.kl for s in scores]}

    rows = []
    for kind, values in fitness.items():
        pick = measured[int(np.argmin(values))]
        rows.append({"fitness": kind, "chromosomes": len(measured), "picked": pick["chromosome"],
                     **{f"spearman {n}": spearman(values, [m[n] for m in measured]) for n in DEV_TEXTS},
                     **{f"picked {n}": pick[n] for n in DEV_TEXTS}})
    columns = ["fitness", "chromosomes", *[f"spearman {n}" for n in DEV_TEXTS], *[f"picked {n}" for n in DEV_TEXTS], "picked"]
    per_candidate = [{"chromosome": m["chromosome"], "ppl": p, "kl": k, **{n: m[n] for n in DEV_TEXTS}}
                     for m, p, k in zip(measured, fitness["ppl"], fitness["kl"])]
    save_results(args.output or f"fitness_kind-{args.candidates}",
                 {"candidates": str(source.relative_to(RESULTS.parent.parent)), "evaluator": config.to_dict(),
                  "best_dev_among_candidates": study["best_heldout_among_candidates"], "rows": rows,
                  "measured": per_candidate}, rows, columns)
    for row in rows:
        print(f"{row['fitness']:4s} " + "  ".join(f"rho {n} {row[f'spearman {n}']:.2f} picked {row[f'picked {n}']:.2f}"
                                                 for n in DEV_TEXTS))


if __name__ == "__main__":
    main()
