"""Perplexity with each single layer skipped, or merged into its predecessor, with and
without RMSNorm calibration; plus the merge-rule and alignment ablations.

    python -m experiments.layer_sensitivity --data-dir ../shared/data

Writes experiments/results/layer_sensitivity.{json,csv,md,png}.
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Sequence

from chromosomes import Gene
from evaluators.config import CALIBRATION_TEXT, EvaluatorConfig
from evaluators.fitness import ModelEvaluator
from experiments.report import RESULTS, save_results


def single_layer(gene: Gene, num_layers: int, layer: int) -> list[int]:
    """Every layer kept but `layer`, which gets `gene`."""
    return [gene if i == layer else Gene.KEEP for i in range(num_layers)]


def columns(calib_steps: int) -> dict[str, tuple[Gene, dict[str, Any]]]:
    """Each column: the gene given to the one changed layer, and the evaluator settings that differ."""
    return {
        "skip": (Gene.SKIP, {}),
        "skip_calib": (Gene.SKIP, {"calib_steps": calib_steps}),
        "merge_mean": (Gene.MERGE, {}),
        "merge_mean_calib": (Gene.MERGE, {"calib_steps": calib_steps}),
        "merge_sum": (Gene.MERGE, {"merge_rule": "sum"}),
        "merge_mean_unaligned": (Gene.MERGE, {"align": False}),
    }


def measure(base: EvaluatorConfig, calib_steps: int) -> list[dict[str, Any]]:
    started = time.perf_counter()
    dense = ModelEvaluator(base)
    n = dense.num_layers
    dense_perplexity = dense.evaluate([[1] * n])[0].perplexity
    del dense
    values: dict[str, dict[int, float]] = {}
    for column, (gene, change) in columns(calib_steps).items():
        evaluator = ModelEvaluator(EvaluatorConfig(**{**base.to_dict(), **change}))
        layers = range(1, n) if gene == Gene.MERGE else range(n)  # layer 0 has nothing to merge into
        scored = evaluator.evaluate([single_layer(gene, n, i) for i in layers])
        values[column] = {i: fitness.perplexity for i, fitness in zip(layers, scored)}
        del evaluator
    rows = [{"layer": i, "dense": dense_perplexity, **{column: v.get(i) for column, v in values.items()}}
            for i in range(n)]
    print(f"measured {n} layers in {time.perf_counter() - started:.0f} s")
    return rows


def plot(rows: Sequence[dict], dense: float, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(10, 4.5))
    layers = [r["layer"] for r in rows]
    for column, style in [("skip", "o-"), ("skip_calib", "o--"), ("merge_mean", "s-"), ("merge_mean_calib", "s--"),
                          ("merge_sum", "x:"), ("merge_mean_unaligned", "^:")]:
        points = [(r["layer"], r[column]) for r in rows if r[column] is not None]
        axis.plot(*zip(*points), style, label=column, markersize=4)
    axis.axhline(dense, color="black", linewidth=0.8, label=f"dense {dense:.2f}")
    axis.set_yscale("log")
    axis.set_xlabel("layer removed (skipped, or merged into the layer before it)")
    axis.set_ylabel("perplexity")
    axis.set_xticks(layers)
    axis.legend(fontsize=8, ncol=3)
    axis.set_title("SmolLM2-135M, single-layer removal, WikiText-2 validation")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.layer_sensitivity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=CALIBRATION_TEXT)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--score-tokens", type=int, default=4096)
    parser.add_argument("--calib-steps", type=int, default=4)
    args = parser.parse_args(argv)
    base = EvaluatorConfig(model=args.model, data=args.data, data_dir=args.data_dir, seq_len=args.seq_len,
                           score_tokens=args.score_tokens, repair="none")  # single cuts as they are
    rows = measure(base, args.calib_steps)
    save_results("layer_sensitivity", {"settings": base.to_dict(), "calib_steps": args.calib_steps, "rows": rows},
                 rows, ["layer", "dense", *columns(args.calib_steps)])
    plot(rows, rows[0]["dense"], RESULTS / "layer_sensitivity.png")


if __name__ == "__main__":
    main()
