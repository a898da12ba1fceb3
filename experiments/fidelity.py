"""How many scoring tokens does fitness need to rank chromosomes the way held-out text does?

A search picks the chromosome with the lowest fitness among thousands, so whatever noise the
scoring text has is selected for: the winner on a few calibration tokens need not be the
winner on held-out text. This takes the best chromosomes GA runs found, scores each on the
first 1, 2, 4, ... windows of the calibration text (repaired as the runs were), measures them
on the dev texts (WikiText-2's dev half and PTB validation: choosing a default is what dev text
is for), and reports, per fidelity, the rank correlation with dev perplexity and the dev
perplexity of the chromosome that fidelity would have picked.

    python -m experiments.fidelity --runs runs/search_quality-repaired/ga-r8-importance-merge-s0,...
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from chromosomes import from_string
from evaluators.config import DEV_TEXTS, EvaluatorConfig
from evaluators.fitness import ModelEvaluator
from evaluators.perplexity import nll_of_hidden
from evaluators.surgery import layer_view
from evaluators.text import text_blocks
from experiments.report import save_results
from ga.checkpoint import RunFolder


def candidates(runs: Sequence[Path], top: int, extra: Sequence[str]) -> list[str]:
    """The `top` best chromosomes each run fully scored at its budget, then the extra ones."""
    chosen: list[str] = []
    for run in runs:
        scored = RunFolder(run).scored()
        chosen += sorted(scored, key=lambda key: scored[key]["nll"])[:top]
    return list(dict.fromkeys(chosen + list(extra)))


@torch.no_grad()
def window_nlls(evaluator: ModelEvaluator, genes: Sequence[int], blocks: torch.Tensor) -> list[float]:
    """Mean NLL per predicted token of each window, so that any prefix's fitness is a mean of these."""
    stack = evaluator.stack(genes)
    with layer_view(evaluator.model, stack.modules, stack.layer_types):
        out = []
        for window in blocks:
            ids = window[None]
            hidden = evaluator.model.model(input_ids=ids, use_cache=False).last_hidden_state
            out.append(float(nll_of_hidden(evaluator.model, hidden, ids)) / (ids.shape[1] - 1))
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """None where it is undefined (fewer than two values): results files hold no NaN."""
    if len(a) < 2:
        return None
    rank_a, rank_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(rank_a, rank_b)[0, 1])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.fidelity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="GA run folders, comma-separated, that scored with the same model")
    parser.add_argument("--top", type=int, default=10, help="best chromosomes taken from each run")
    parser.add_argument("--extra", default="", help="more chromosomes (gene strings), comma-separated")
    parser.add_argument("--windows", type=int, default=16, help="calibration windows scored (fidelities 1, 2, 4, ... of them)")
    parser.add_argument("--seq-len", type=int, default=0, help="calibration window length (0: the runs' own)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--eval-seq-len", type=int, default=1024)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--output", default="fidelity", help="stem of the files under experiments/results")
    args = parser.parse_args(argv)

    runs = [Path(p) for p in args.runs.split(",")]
    definition = RunFolder(runs[0]).load_checkpoint()["definition"]
    seq_len = args.seq_len or definition["seq_len"]
    repair = definition.get("repair") or {"method": "none"}  # runs older than seam repair scored raw cuts
    settings = {} if repair["method"] == "none" else {"repair_tokens": repair["tokens"], "repair_ridge": repair["ridge"],
                                                       "repair_inputs": repair["inputs"], "repair_min_run": repair.get("min_run", 1)}
    config = EvaluatorConfig(model=definition["model"], data=definition["data"], data_dir=args.data_dir,
                             seq_len=seq_len, score_tokens=args.windows * seq_len, threads=args.threads,
                             repair=repair["method"], **settings)
    evaluator = ModelEvaluator(config)
    texts = {name: text_blocks(name, evaluator.tokenizer, args.eval_seq_len, args.eval_tokens, args.data_dir)
             for name in DEV_TEXTS}
    keys = candidates(runs, args.top, [k for k in args.extra.split(",") if k])
    measured = []
    for key in tqdm(keys, desc="chromosomes", unit="chromosome"):
        genes = from_string(key)
        measured.append({"chromosome": key, "window_nll": window_nlls(evaluator, genes, evaluator.split.score),
                         **evaluator.heldout(genes, texts)})

    fidelities = [2 ** i for i in range(int(math.log2(args.windows)) + 1)]
    rows = []
    for windows in fidelities:
        fitness = [float(np.mean(m["window_nll"][:windows])) for m in measured]
        pick = measured[int(np.argmin(fitness))]
        row = {"tokens": windows * (config.seq_len - 1), "windows": windows, "chromosomes": len(measured),
               "picked": pick["chromosome"]}
        for name in DEV_TEXTS:
            row[f"spearman {name}"] = spearman(fitness, [m[name] for m in measured])
            row[f"picked {name}"] = pick[name]
        rows.append(row)
    best = {name: min(m[name] for m in measured) for name in DEV_TEXTS}
    columns = ["tokens", "chromosomes", *[f"spearman {n}" for n in DEV_TEXTS], *[f"picked {n}" for n in DEV_TEXTS], "picked"]
    save_results(args.output, {"runs": [str(r) for r in runs], "evaluator": config.to_dict(), "rows": rows,
                               "best_heldout_among_candidates": best, "measured": measured}, rows, columns)
    for row in rows:
        print(f"{row['tokens']:6d} tokens  " + "  ".join(f"rho {n} {row[f'spearman {n}']:.2f} picked {row[f'picked {n}']:.2f}"
                                                      for n in DEV_TEXTS))
    print("best held-out among candidates: " + ", ".join(f"{n} {v:.2f}" for n, v in best.items()))


if __name__ == "__main__":
    main()
