"""Fitness evaluations per second: gaprune's evaluator against a naive one, fairly, in one run.

The workload is a real GA run's requests, replayed generation by generation from its run folder:
each generation's screenings (on the first --screen-tokens) and full evaluations, in the order
the run made them (the fitness cache keeps them in that order, and the logbook says how many
each generation made). Both evaluators answer only those: like DEAP's own loops, which evaluate
only individuals whose fitness is invalid, the naive one never scores a chromosome twice either,
so the comparison is of scoring alone:
- naive: the model cut to the chromosome (repaired and merged as the run was), the whole HF
  forward with labels, one chromosome after another;
- gaprune: `ModelEvaluator.evaluate` on the generation's batch, which shares the hidden states
  of common leading layers between chromosomes.
Both use one evaluator, so repair fits and fused layers are shared (and warm after the first
round). The whole replay runs --rounds times, the order alternating (A B, B A, ...), and each
evaluator's median is reported.

    python -m experiments.throughput --run runs/<name> --data-dir ../shared/data --threads 1
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from chromosomes import from_string
from evaluators.config import EvaluatorConfig
from evaluators.fitness import ModelEvaluator
from evaluators.surgery import layer_view
from experiments.report import save_results
from ga.checkpoint import RunFolder

Requests = list[tuple[int | None, list[str]]]  # per batch: tokens (None: the full scoring text), gene strings


@torch.no_grad()
def naive_perplexity(evaluator: ModelEvaluator, genes: Sequence[int], windows: int | None = None) -> float:
    """The straightforward way: cut the model, run the whole HF forward with labels (on the first
    `windows` scoring windows, or all)."""
    stack = evaluator.stack(genes)
    blocks, size = evaluator.split.score[:windows], evaluator.config.batch_size
    total = 0.0
    with layer_view(evaluator.model, stack.modules, stack.layer_types):
        for start in range(0, blocks.shape[0], size):
            ids = blocks[start:start + size].to(evaluator.model.device)
            total += float(evaluator.model(input_ids=ids, labels=ids, use_cache=False).loss) * ids.shape[0] * (ids.shape[1] - 1)
    return math.exp(total / (blocks.shape[0] * (blocks.shape[1] - 1)))


def run_requests(checkpoint: dict[str, Any], screen_tokens: int, generations: int | None = None) -> Requests:
    """The run's scoring calls in order: the seeding scans, then per generation its screenings
    and its full evaluations (the caches keep insertion order; the logbook gives the counts),
    up to generation `generations` (all when None), so that a long run can be replayed in part."""
    state = checkpoint["state"]
    full, screened = list(state["cache"]), list(state["screen_cache"])
    logbook = state["logbook"][:None if generations is None else generations + 1]
    seeding = logbook[0]["total_evals"] - logbook[0]["evals"]
    batches: Requests = [(None, full[:seeding])] if seeding else []
    done_full, done_screened = seeding, 0
    for record in logbook:
        screenings = record["screenings"] - done_screened
        if screenings:
            batches.append((screen_tokens, screened[done_screened:done_screened + screenings]))
        if record["evals"]:
            batches.append((None, full[done_full:done_full + record["evals"]]))
        done_full, done_screened = done_full + record["evals"], record["screenings"]
    return batches


def replay(evaluator: ModelEvaluator, requests: Requests, naive: bool) -> tuple[float, list[float]]:
    started = time.perf_counter()
    values: list[float] = []
    for tokens, keys in requests:
        genes = [from_string(key) for key in keys]
        if naive:
            windows = None if tokens is None else tokens // evaluator.config.seq_len
            values += [naive_perplexity(evaluator, g, windows) for g in genes]
        else:
            values += [f.perplexity for f in evaluator.evaluate(genes, tokens)]
    return time.perf_counter() - started, values


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a GA run folder whose requests are replayed")
    parser.add_argument("--rounds", type=int, default=3, help="replays per evaluator, alternating which goes first")
    parser.add_argument("--generations", type=int, default=None,
                        help="replay the seeding and generations 0..N only (default: the whole run)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    run = RunFolder(Path(args.run))
    saved = run.read_config()
    checkpoint = run.load_checkpoint()
    requests = run_requests(checkpoint, saved["search"]["screen_tokens"], args.generations)
    config = EvaluatorConfig.from_dict({**saved["evaluator"], "data_dir": args.data_dir or saved["evaluator"].get("data_dir"),
                                        "threads": args.threads, "align_cache": None})
    evaluator = ModelEvaluator(config)
    if evaluator.describe() != checkpoint["definition"]:
        raise SystemExit(f"{run.path} measured fitness otherwise than this code does: the replay would not be its run")

    seconds: dict[str, list[float]] = {"naive": [], "gaprune": []}
    values: dict[str, list[float]] = {}
    for round_ in range(args.rounds):
        for name in (("naive", "gaprune") if round_ % 2 == 0 else ("gaprune", "naive")):
            taken, values[name] = replay(evaluator, requests, naive=name == "naive")
            seconds[name].append(taken)
            print(f"round {round_} {name}: {taken:.1f} s", flush=True)
    agreement = max(abs(a - b) / b for a, b in zip(values["gaprune"], values["naive"]))
    count = sum(len(keys) for _, keys in requests)
    screenings = sum(len(keys) for tokens, keys in requests if tokens is not None)
    rows = [{"evaluator": name, "requests": count, "median seconds": statistics.median(times),
             "requests_per_s": count / statistics.median(times),
             "speedup": statistics.median(seconds["naive"]) / statistics.median(times),
             "seconds per round": ", ".join(f"{t:.1f}" for t in times)}
            for name, times in seconds.items()]
    columns = ["evaluator", "requests", "median seconds", "requests_per_s", "speedup", "seconds per round"]
    save_results("throughput", {"run": str(run.path), "requests": count, "screenings": screenings,
                                "batches": len(requests), "generations": args.generations, "rounds": args.rounds,
                                "evaluator": config.to_dict(),
                                "device": str(evaluator.model.device), "threads": torch.get_num_threads(),
                                "max_relative_difference_vs_naive": agreement, "rows": rows}, rows, columns)
    for row in rows:
        print(f"{row['evaluator']:8s} {row['requests_per_s']:.3f} requests/s  x{row['speedup']:.2f}")
    print(f"largest relative perplexity difference, gaprune vs naive: {agreement:.2e}")


if __name__ == "__main__":
    main()
