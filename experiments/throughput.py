"""Fitness evaluations per second: gaprune's evaluator against a naive one, in one run.

The workload replays the generations of a real GA run (its checkpoint keeps every
generation's population). The naive evaluator answers every request with a full forward of
the model as it would be cut (HF forward with labels, fp32, no caches). gaprune answers from
its fitness cache when it can and shares the hidden states of common leading layers between
the chromosomes of a generation (prefix sharing).

    python -m experiments.throughput --run runs/<name> --data-dir ../shared/data
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Sequence

import torch

from chromosomes import from_string
from evaluators.fitness import EvaluatorConfig, ModelEvaluator
from evaluators.surgery import layer_view
from experiments.report import save_results


@torch.no_grad()
def naive_perplexity(evaluator: ModelEvaluator, genes: Sequence[int]) -> float:
    """The straightforward way: cut the model, run the whole HF forward with labels."""
    stack = evaluator.stack(genes)
    blocks, size = evaluator.split.score, evaluator.config.batch_size
    total = 0.0
    with layer_view(evaluator.model, stack.modules, stack.layer_types):
        for start in range(0, blocks.shape[0], size):
            ids = blocks[start:start + size]
            total += float(evaluator.model(input_ids=ids, labels=ids, use_cache=False).loss) * ids.shape[0] * (ids.shape[1] - 1)
    return math.exp(total / (blocks.shape[0] * (blocks.shape[1] - 1)))


def replay_naive(evaluator: ModelEvaluator, generations: list[list[str]]) -> tuple[float, list[float]]:
    started = time.perf_counter()
    values = [naive_perplexity(evaluator, from_string(key)) for population in generations for key in population]
    return time.perf_counter() - started, values


def replay_gaprune(evaluator: ModelEvaluator, generations: list[list[str]], use_cache: bool) -> tuple[float, int]:
    """Each generation scored as the GA does it: known chromosomes from the cache, the rest in one batch."""
    cache: dict[str, float] = {}
    scored = 0
    started = time.perf_counter()
    for population in generations:
        todo = list(dict.fromkeys(k for k in population if k not in cache)) if use_cache else list(population)
        for key, fitness in zip(todo, evaluator.evaluate([from_string(k) for k in todo])):
            cache[key] = fitness.perplexity
        scored += len(todo)
    return time.perf_counter() - started, scored


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a GA run folder whose generations are replayed")
    parser.add_argument("--generations", type=int, default=0, help="how many generations to replay, from the first (0: all)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--score-tokens", type=int, default=2048)
    args = parser.parse_args(argv)
    run = Path(args.run)
    saved = json.loads((run / "config.json").read_text())["evaluator"]
    history = json.loads((run / "checkpoint.json").read_text())["state"]["history"]
    generations = [entry["population"] for entry in history[: args.generations or None]]
    config = EvaluatorConfig(**{**saved, "data_dir": args.data_dir or saved.get("data_dir"),
                                "score_tokens": args.score_tokens, "calib_steps": 0,
                                "repair": saved.get("repair", "none")})  # runs before seam repair scored raw cuts
    requests = sum(len(p) for p in generations)

    shared = ModelEvaluator(config)
    ours_time, ours_scored = replay_gaprune(shared, generations, use_cache=True)
    prefix_only = ModelEvaluator(config)
    prefix_time, prefix_scored = replay_gaprune(prefix_only, generations, use_cache=False)
    naive = ModelEvaluator(EvaluatorConfig(**{**config.to_dict(), "share_prefix": False}))
    naive_time, naive_values = replay_naive(naive, generations)
    check = shared.evaluate([from_string(k) for k in generations[-1][:4]])
    agreement = max(abs(f.perplexity - v) / v for f, v in zip(check, naive_values[-len(generations[-1]):][:4]))

    rows = [
        {"evaluator": "naive (HF forward, no caches)", "requests": requests, "forwards": requests,
         "seconds": naive_time, "requests_per_s": requests / naive_time, "speedup": 1.0},
        {"evaluator": "gaprune, prefix sharing only", "requests": requests, "forwards": prefix_scored,
         "seconds": prefix_time, "requests_per_s": requests / prefix_time, "speedup": naive_time / prefix_time},
        {"evaluator": "gaprune (cache + prefix sharing)", "requests": requests, "forwards": ours_scored,
         "seconds": ours_time, "requests_per_s": requests / ours_time, "speedup": naive_time / ours_time},
    ]
    columns = ["evaluator", "requests", "forwards", "seconds", "requests_per_s", "speedup"]
    save_results("throughput", {"run": str(run), "generations": len(generations), "evaluator": config.to_dict(),
                                "device": str(shared.model.device), "threads": torch.get_num_threads(),
                                "max_relative_difference_vs_naive": agreement, "rows": rows}, rows, columns)
    for row in rows:
        print(f"{row['evaluator']:36s} {row['requests_per_s']:.3f} requests/s  x{row['speedup']:.2f}")
    print(f"largest relative perplexity difference, gaprune vs naive: {agreement:.2e}")


if __name__ == "__main__":
    main()
