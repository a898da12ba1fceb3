"""What seam repair costs a search: seconds per fitness evaluation without repair, with the default
repair (fits on dense inputs, shared between chromosomes) and with fits on the pruned model's
own inputs, in one process on the same chromosomes.

The chromosomes are a GA's first generations as a search meets them: the removal-importance
seed and its neighbours one to three mutations away, scored in batches of --batch chromosomes.
The three evaluators take turns batch by batch (A B C A B C ...), so a busy machine slows
each alike; the table gives the median seconds per evaluation and the ratio to no repair.
The one-time costs (the dense states each repair fits to) are reported apart.

    python -m experiments.repair_cost --data-dir ../shared/data --threads 1
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Sequence

from chromosomes import to_string
from evaluators.config import EvaluatorConfig
from evaluators.fitness import ModelEvaluator
from experiments.report import save_results
from ga.operators import mutate

SEED = "111000111111000111111111100111"  # removal importance, 8 of 30 (experiments/repair_variants)
VARIANTS = {"none": {"repair": "none"}, "lsq-dense": {"repair_inputs": "dense"},  # lsq-dense: the default
            "lsq-pruned": {"repair_inputs": "pruned"}}


def neighbours(count: int, seed: int) -> list[list[int]]:
    """Distinct chromosomes one to three uniform mutations from the seed, as a GA proposes them."""
    rng = random.Random(seed)
    genes = [int(c) for c in SEED]
    removed = genes.count(0)
    found: dict[str, list[int]] = {}
    while len(found) < count:
        child = list(genes)
        for _ in range(rng.randint(1, 3)):
            child = mutate(child, removed=removed, merge=False, flip_prob=0.0, rng=rng)[0]
        found.setdefault(to_string(child), list(child))
    return list(found.values())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.repair_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--chromosomes", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8, help="chromosomes per evaluate call (a generation's new ones)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"any of: {', '.join(VARIANTS)} "
                        "(each keeps its own model and dense states in memory)")
    parser.add_argument("--output", default="repair_cost")
    args = parser.parse_args(argv)

    evaluators, setup = {}, {}
    chosen = {name: VARIANTS[name] for name in args.variants.split(",")}
    for name, settings in chosen.items():
        started = time.perf_counter()
        evaluators[name] = ModelEvaluator(EvaluatorConfig(data_dir=args.data_dir, threads=args.threads, **settings))
        evaluators[name].evaluate([[int(c) for c in SEED]])  # dense states, first fits: paid once per run
        setup[name] = time.perf_counter() - started
    population = neighbours(args.chromosomes, seed=0)
    seconds: dict[str, list[float]] = {name: [] for name in chosen}
    for start in range(0, len(population), args.batch):
        batch = population[start:start + args.batch]
        for name, evaluator in evaluators.items():
            began = time.perf_counter()
            evaluator.evaluate(batch)
            seconds[name].append((time.perf_counter() - began) / len(batch))
    base = statistics.median(seconds["none"])
    rows = [{"repair": name, "seconds_per_evaluation": statistics.median(values),
             "ratio_to_no_repair": statistics.median(values) / base, "setup_seconds": setup[name]}
            for name, values in seconds.items()]
    for row in rows:
        print(row, flush=True)
    save_results(args.output, {"settings": vars(args), "seconds": seconds, "rows": rows}, rows,
                 ["repair", "seconds_per_evaluation", "ratio_to_no_repair", "setup_seconds"])


if __name__ == "__main__":
    main()
