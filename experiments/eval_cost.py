"""What one fitness evaluation costs on the joint space against the layers space, measured in one run.

Both spaces are scored by the same evaluator (the default: perplexity on 4,096 calibration tokens,
every cut repaired) on genomes as a search proposes them: the one-shot seed of each space with 1
to 3 of its own mutations (swaps and seam moves of whole layers; level switches of sub-layers),
at the same share of the decoder parameters. Setup is paid first and reported apart (the dense
states the repair fits to, the units' ranking, every layer's Gram matrices for refits); then
rounds alternate one new genome of each space, each scored alone (no prefix shared with the one
before), timed from genome to fitness (cutting, refits and seam fits included), and the medians
are compared.

    python -m experiments.eval_cost --data-dir ../shared/data --threads 2

Results: experiments/results/eval_cost.{json,csv,md}.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any, Sequence

from chromosomes import to_string
from evaluators.config import EvaluatorConfig
from evaluators.fitness import ModelEvaluator
from experiments.report import save_results
from ga.config import SearchConfig
from ga.engine import width_seed
from ga.problem import Problem
from ga.seeding import skip_lowest

KINDS = ("attention", "mlp")


def timed(call) -> tuple[float, Any]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def variants(problem: Problem, seed: list, count: int, rng: random.Random) -> list[list]:
    """Distinct genomes 1 to 3 mutations from the seed, as a search's first generation proposes them."""
    seen, out = {to_string(seed)}, []
    while len(out) < count:
        genes = list(seed)
        for _ in range(rng.randint(1, 3)):
            problem.mutate(genes, rng, flip_prob=0.0, seam_prob=0.5)
        if to_string(genes) not in seen:
            seen.add(to_string(genes))
            out.append(genes)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.eval_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--share", type=float, default=0.26667, help="share of the decoder parameters removed")
    parser.add_argument("--rounds", type=int, default=12, help="alternated rounds (one genome of each space per round)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="eval_cost")
    args = parser.parse_args(argv)
    evaluator = ModelEvaluator(EvaluatorConfig(data_dir=args.data_dir, threads=args.threads, share_prefix=False))
    definition = evaluator.describe()
    layers = Problem.of(SearchConfig(remove=round(args.share * evaluator.num_layers)), definition)
    joint = Problem.of(SearchConfig(params=args.share), definition)
    rng = random.Random(0)

    # -- setup, paid once per run and reported apart ---------------------------------------------
    builder = evaluator.builder
    setup = {}
    setup["dense states s"], _ = timed(builder.repairer.dense_states)
    setup["middle states s"], _ = timed(builder.repairer.middle_states)
    setup["ranking s"], _ = timed(evaluator.units)
    setup["gram matrices s"], _ = timed(lambda: [builder.repairer.gram(layer, kind) for layer in
                                                 range(evaluator.num_layers) for kind in KINDS])
    single = evaluator.evaluate([[0 if j == i else 1 for j in range(evaluator.num_layers)]
                                 for i in range(evaluator.num_layers)])
    seeds = {"layers": skip_lowest([f.value for f in single], layers.layers), "joint": width_seed(evaluator, joint, rng)}
    problems = {"layers": layers, "joint": joint}
    genomes = {space: variants(problems[space], seeds[space], args.rounds + 1, rng) for space in problems}
    for space in problems:  # warm-up: first calls allocate
        evaluator.evaluate([genomes[space].pop()])

    # -- alternated rounds -----------------------------------------------------------------------
    seconds: dict[str, list[float]] = {space: [] for space in problems}
    for round_ in range(args.rounds):
        for space in (problems if round_ % 2 == 0 else reversed(list(problems))):
            took, _ = timed(lambda: evaluator.evaluate([genomes[space][round_]]))
            seconds[space].append(took)
    rows = [{"space": space, "evaluations": len(values), "median s": statistics.median(values),
             "min s": min(values), "max s": max(values)} for space, values in seconds.items()]
    ratio = rows[1]["median s"] / rows[0]["median s"]
    rows.append({"space": "joint / layers", "median s": ratio})
    print(setup, rows, flush=True)
    save_results(args.output, {"settings": vars(args), "setup": setup, "rows": rows, "seconds": seconds,
                               "ratio": ratio, "evaluator": evaluator.config.to_dict()},
                 rows, ["space", "evaluations", "median s", "min s", "max s"])


if __name__ == "__main__":
    main()
