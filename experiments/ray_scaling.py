"""Evaluations per second of the Ray pool with 1 and with 2 CPU actors, on the same generations.

Both layouts get the same cores: one actor with all of them as torch threads, or two actors with
half each. Each of --generations is a new set of random skip-only chromosomes (seeds seed,
seed+1, ...; a repeated generation would be nearly free, as the actors' prefix states would
still hold it); the layouts alternate on every generation, after a short warm-up, and the
fitness values they compute are compared.

    python -m experiments.ray_scaling --data-dir ../shared/data
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from typing import Any, Sequence

import ray
import torch
from transformers import AutoConfig

from chromosomes import budget, random_chromosome, to_string
from evaluators.config import CALIBRATION_TEXT, DEFAULT_MODEL, EvaluatorConfig
from evaluators.fitness import Fitness
from evaluators.models import ModelLoadError, model_folder
from evaluators.pool import PoolError, RayEvaluatorPool, start_actors
from evaluators.workers import WorkerPlan
from experiments.report import save_results
from gaprune.options import fail

COLUMNS = ["layout", "actors", "threads_per_actor", "start_s", "generation_s", "evals_per_s", "speedup"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.ray_scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model to score (default: {DEFAULT_MODEL})")
    parser.add_argument("--data", default=CALIBRATION_TEXT, help=f"scoring text (default: {CALIBRATION_TEXT})")
    parser.add_argument("--data-dir", default=None, help="local copy of the named texts (default: $GAPRUNE_DATA_DIR)")
    parser.add_argument("--population", type=int, default=8, help="chromosomes in the generation (default: 8)")
    parser.add_argument("--remove", type=int, default=8, help="layers each chromosome skips (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first generation; the next ones use seed+1, ... (default: 0)")
    parser.add_argument("--score-tokens", type=int, default=2048, help="tokens each chromosome is scored on (default: 2048)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window (default: 512)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2,
                        help="cores both layouts share: 1 actor x CORES threads vs 2 actors x CORES/2 (default: all)")
    parser.add_argument("--generations", type=int, default=2, help="generations each layout scores, timed one by one (default: 2)")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds to wait for the actors to load")
    return parser


def random_generation(num_layers: int, remove: int, size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [random_chromosome(num_layers, remove, rng, allow_merge=False) for _ in range(size)]


def start_layout(config: EvaluatorConfig, plan: WorkerPlan, start_timeout: float) -> tuple[RayEvaluatorPool, float]:
    """The layout's pool, its actors loaded and warmed up, and the seconds the loading took."""
    started = time.perf_counter()
    pool = RayEvaluatorPool(start_actors(config, plan), start_timeout)
    seconds = time.perf_counter() - started
    # One window per actor: the first forward pays one-time costs (allocations, kernel choice).
    pool.evaluate([[1] * pool.num_layers] * plan.actors, tokens=config.seq_len)
    return pool, seconds


def time_generation(pool: RayEvaluatorPool, generation: list[list[int]]) -> tuple[float, list[Fitness]]:
    tick = time.perf_counter()
    fitness = pool.evaluate(generation)
    return time.perf_counter() - tick, fitness


def compare_layouts(config: EvaluatorConfig, plans: Sequence[WorkerPlan], generations: list[list[list[int]]],
                    start_timeout: float) -> tuple[list[dict[str, Any]], list[list[Fitness]]]:
    """Score every generation with each layout, alternating between layouts so that they share
    the machine's background load; a row per layout with the median generation time, and the
    fitness each layout computed for all generations."""
    pools, rows, fitness = [], [], [[] for _ in plans]
    try:
        for plan in plans:
            pool, start_seconds = start_layout(config, plan, start_timeout)
            pools.append(pool)
            rows.append({"layout": plan.describe(), "actors": plan.actors, "threads_per_actor": plan.threads,
                         "start_s": start_seconds, "generations_s": []})
        for generation in generations:
            for index, (pool, row) in enumerate(zip(pools, rows)):
                seconds, scored = time_generation(pool, generation)
                fitness[index] += scored
                row["generations_s"].append(seconds)
    finally:
        for pool in pools:
            pool.close()
    for row in rows:
        row["generation_s"] = statistics.median(row["generations_s"])
        row["evals_per_s"] = len(generations[0]) / row["generation_s"]
        row["speedup"] = rows[0]["generation_s"] / row["generation_s"]
    return rows, fitness


def largest_relative_difference(a: Sequence[Fitness], b: Sequence[Fitness]) -> float:
    return max(abs(x.perplexity - y.perplexity) / y.perplexity for x, y in zip(a, b))


def check_arguments(args: argparse.Namespace) -> None:
    if args.population < 2:
        fail(f"--population must be at least 2, got {args.population}")
    if args.generations < 1:
        fail(f"--generations must be at least 1, got {args.generations}")
    if args.cores < 2:
        fail(f"--cores must be at least 2 (two actors need a core each), got {args.cores}")
    if not args.start_timeout > 0:
        fail(f"--start-timeout must be positive, got {args.start_timeout}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_arguments(args)
    try:
        config = EvaluatorConfig(model=args.model, data=args.data, data_dir=args.data_dir, device="cpu",
                                 seq_len=args.seq_len, score_tokens=args.score_tokens, repair="none")
        num_layers = AutoConfig.from_pretrained(model_folder(args.model)).num_hidden_layers
        remove = budget(num_layers, remove=args.remove)
    except (ValueError, ModelLoadError) as error:
        fail(str(error))
    generations = [random_generation(num_layers, remove, args.population, args.seed + r) for r in range(args.generations)]
    plans = [WorkerPlan(1, 0, args.cores), WorkerPlan(2, 0, args.cores // 2)]

    load_before = os.getloadavg()
    # Both layouts stay loaded at once so that their timings can alternate: Ray is told of twice
    # the cores, which only idle actors ever hold (one layout scores at a time).
    ray.init(num_cpus=2 * args.cores, num_gpus=0, include_dashboard=False)
    try:
        rows, (one_fitness, two_fitness) = compare_layouts(config, plans, generations, args.start_timeout)
    except (ValueError, ModelLoadError, TimeoutError, PoolError) as error:
        fail(str(error))
    finally:
        ray.shutdown()
    difference = largest_relative_difference(two_fitness, one_fitness)
    save_results("ray_scaling", {
        "evaluator": config.to_dict(), "generations": [[to_string(genes) for genes in generation] for generation in generations],
        "seed": args.seed, "cores": args.cores, "machine_cpus": os.cpu_count(), "platform": platform.platform(),
        "torch": torch.__version__, "ray": ray.__version__, "load_average_before": load_before,
        "load_average_after": os.getloadavg(), "rows": rows,
        "perplexities": [f.perplexity for f in one_fitness],
        "max_relative_difference_between_layouts": difference,
    }, rows, COLUMNS)

    print(f"{args.generations} generations of {args.population} chromosomes of {args.model} removing {remove} of {num_layers} layers, "
          f"{config.score_blocks * (config.seq_len - 1)} scored tokens each, {args.cores} cores")
    print(f"{'layout':34s} {'start s':>8s} {'generation s':>13s} {'evals/s':>8s} {'speedup':>8s}")
    for row in rows:
        print(f"{row['layout']:34s} {row['start_s']:8.1f} {row['generation_s']:13.1f} "
              f"{row['evals_per_s']:8.3f} {row['speedup']:8.2f}")
    print(f"largest relative perplexity difference between the layouts: {difference:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
