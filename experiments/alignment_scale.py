"""What aligning one pair of layers costs as MLPs grow: the way gaprune aligned before (raw
activations of 2,048 tokens kept, correlations in fp64, Hungarian assignment) against streamed
fp32 statistics with the Hungarian or the greedy assignment, at 1,536 (SmolLM2-135M), 4,096
and 14,336 (Llama-3-8B) MLP units, on CPU.

Methods: `before` (raw activations kept, fp64, Hungarian), `streamed-hungarian` and
`streamed-greedy` (what gaprune does now; `auto` takes the greedy matching only on a GPU above
4,096 units).

Activations are synthetic, shaped like real ones: both layers' units read the same low-rank
latent factors (as MLP units read one residual stream), and each of the other layer's units
also carries a weak copy of one anchor unit (a planted permutation). Matched the way real
SmolLM2-135M pairs are (measured below: mean matched correlation 0.22 to 0.28, greedy and
Hungarian agreeing on half the units), they give 0.27 and 62 % agreement at 1,536 units. A
matching's quality is the mean of the *population* correlation (known in closed form for this
model, so free of sampling noise) over the pairs it chose: the correlation it would have on
unlimited tokens. The streamed methods read `auto_align_tokens(units)` tokens (as many as
units, at least 2,048); before, every size read 2,048. Each measurement runs in its own
process, whose peak resident memory above what it held before is reported.

    python -m experiments.alignment_scale --units 1536,4096,14336 --threads 2

With --smollm2, the two assignments are also compared on real layer pairs of SmolLM2-135M
(1,536 units): summed correlation, and calibration perplexity of the merged model.
Results: experiments/results/alignment_scale.{json,csv,md}.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any, Sequence

import psutil
import torch

from evaluators.alignment import Moments, auto_align_tokens, greedy, hungarian
from experiments.report import save_results

METHODS = ("before", "streamed-hungarian", "streamed-greedy")
OLD_TOKENS = 2048
BATCH = 4096  # tokens a streamed batch holds
RANK = 64  # latent factors both layers read
PLANTED, SCALE, NOISE = 0.2, 1.22, 0.7  # weight of the planted copy, the anchor units' spread, private noise


class Planted:
    """Deterministic synthetic activations of two layers, batch by batch:
    anchor = z W + 0.7 e,  other = PLANTED * anchor[:, planted] / 1.22 + z V + 0.7 e'
    with z [tokens, RANK] shared latent factors, W and V [RANK, units] fixed, e and e' noise."""

    def __init__(self, units: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.units = units
        self.mixing = torch.randn(RANK, units, generator=generator) / RANK ** 0.5  # W
        self.other_mixing = torch.randn(RANK, units, generator=generator) / RANK ** 0.5  # V
        self.planted = torch.randperm(units, generator=generator)  # other's unit u carries the anchor's planted[u]
        self.seed = seed

    def batch(self, index: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + index + 1)
        latent = torch.randn(tokens, RANK, generator=generator)
        anchor = latent @ self.mixing + NOISE * torch.randn(tokens, self.units, generator=generator)
        other = PLANTED / SCALE * anchor[:, self.planted] + latent @ self.other_mixing
        other += NOISE * torch.randn(tokens, self.units, generator=generator)
        return anchor, other

    def batches(self, tokens: int):
        for index, start in enumerate(range(0, tokens, BATCH)):
            yield self.batch(index, min(BATCH, tokens - start))

    def population_correlation(self, order: torch.Tensor) -> float:
        """Mean over anchor units u of the population correlation of u with other's unit order[u]."""
        w, v, c = self.mixing, self.other_mixing, PLANTED / SCALE
        p = self.planted[order]  # the anchor unit each matched other unit carries
        def cov_anchor(i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
            return (w[:, i] * w[:, j]).sum(0) + NOISE ** 2 * (i == j)
        covariance = c * cov_anchor(torch.arange(self.units), p) + (w * v[:, order]).sum(0)
        var_anchor = cov_anchor(torch.arange(self.units), torch.arange(self.units))
        var_other = c ** 2 * cov_anchor(p, p) + (v[:, order] ** 2).sum(0) + NOISE ** 2 \
            + 2 * c * (w[:, p] * v[:, order]).sum(0)
        return float((covariance / (var_anchor * var_other).sqrt()).mean())


def correlation_before(data: Planted) -> torch.Tensor:
    """The earlier pipeline: every token's activations kept (fp32), standardized in fp64."""
    anchor, other = map(torch.cat, zip(*data.batches(OLD_TOKENS)))

    def standardize(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        x = x - x.mean(0)
        return x / x.norm(dim=0).clamp_min(1e-12)
    return standardize(anchor).T @ standardize(other)


def correlation_streamed(data: Planted) -> tuple[torch.Tensor, int]:
    moments = Moments()
    tokens = auto_align_tokens(data.units, 1024)
    for anchor, other in data.batches(tokens):
        moments.add(anchor, other)
    return moments.correlation(), tokens


def measure_one(units: int, method: str) -> dict[str, Any]:
    """One method at one size, in this process (a fresh one per measurement)."""
    data = Planted(units)
    before = psutil.Process().memory_info().rss
    started = time.perf_counter()
    if method == METHODS[0]:
        similarity, tokens = correlation_before(data), OLD_TOKENS
    else:
        similarity, tokens = correlation_streamed(data)
    statistics_s = time.perf_counter() - started
    started = time.perf_counter()
    order = greedy(similarity) if method.endswith("greedy") else hungarian(similarity)
    assignment_s = time.perf_counter() - started
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, psutil.Process().memory_info().rss)
    return {"units": units, "method": method, "tokens": tokens, "statistics s": statistics_s,
            "assignment s": assignment_s, "seconds per pair": statistics_s + assignment_s,
            "peak GiB": (peak - before) / 2**30,
            "sample correlation": float(similarity[torch.arange(units), order].mean()),
            "population correlation": data.population_correlation(order)}


def run_in_subprocess(units: int, method: str, threads: int) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "experiments.alignment_scale", "--one", f"{units}:{method}",
                           "--threads", str(threads)], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def smollm2_pairs(args: argparse.Namespace, pairs: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
    """Both assignments on real pairs of SmolLM2-135M: summed correlation and merged fitness."""
    from chromosomes import Gene
    from evaluators.alignment import pair_statistics
    from evaluators.families import Geometry
    from evaluators.config import EvaluatorConfig
    from evaluators.fitness import ModelEvaluator

    rows = []
    evaluators = {method: ModelEvaluator(EvaluatorConfig(data_dir=args.data_dir, align_method=method, repair="none",
                                                         threads=args.threads))
                  for method in ("hungarian", "greedy")}
    reference = evaluators["hungarian"]
    geometry = Geometry.of(reference.model.config)
    blocks = reference.builder.align_blocks
    for anchor, other in pairs:
        moments, _ = pair_statistics(reference.model, reference.builder.dense_layers, reference.family, geometry, blocks,
                                     reference.batch_size, anchor, other)
        similarity = moments.correlation()
        genes = [Gene.KEEP] * reference.num_layers
        genes[other] = Gene.MERGE
        row: dict[str, Any] = {"pair": f"{anchor}<-{other}"}
        for method, evaluator in evaluators.items():
            started = time.perf_counter()
            order = hungarian(similarity) if method == "hungarian" else greedy(similarity)
            row[f"{method} s"] = time.perf_counter() - started
            row[f"{method} mean correlation"] = float(similarity[torch.arange(similarity.shape[0]), order].mean())
            row[f"{method} merged ppl"] = evaluator.evaluate([genes])[0].perplexity
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.alignment_scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--units", default="1536,4096,14336", help="MLP widths, comma-separated")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"any of: {', '.join(METHODS)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smollm2", action="store_true", help="also compare the assignments on SmolLM2-135M pairs")
    parser.add_argument("--pairs", default="12:13,13:14,25:26,5:6,20:21", help="SmolLM2 pairs anchor:other")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # units:method, run in this process
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        units, method = args.one.split(":", 1)
        print(json.dumps(measure_one(int(units), method)))
        return
    rows = []
    for units in (int(u) for u in args.units.split(",")):
        for method in args.methods.split(","):
            rows.append(run_in_subprocess(units, method, args.threads))
            print(" ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()),
                  flush=True)
    real = smollm2_pairs(args, [tuple(int(x) for x in p.split(":")) for p in args.pairs.split(",")]) \
        if args.smollm2 else []
    columns = ["units", "method", "tokens", "statistics s", "assignment s", "seconds per pair", "peak GiB",
               "sample correlation", "population correlation"]
    save_results("alignment_scale", {"threads": args.threads, "batch_tokens": BATCH, "rows": rows,
                                     "smollm2_pairs": real}, rows, columns)


if __name__ == "__main__":
    main()
