"""Perplexity with each single layer skipped, or merged into its predecessor, with and
without RMSNorm calibration; plus the merge-rule and alignment ablations.

    python -m experiments.layer_sensitivity --data-dir ../shared/data

Writes experiments/results/layer_sensitivity.{json,csv,md,png}.
"""
from __future__ import annotations

import argparse
import time
from typing import Sequence

from evaluators.fitness import EvaluatorConfig, ModelEvaluator
from evaluators.text import CALIBRATION_TEXT
from experiments.report import RESULTS, save_results

# column -> evaluator settings that differ from the plain one
SETTINGS = {
    "merge_mean": {},
    "merge_mean_calib": {"calib_steps": 4},
    "merge_sum": {"merge_rule": "sum"},
    "merge_mean_unaligned": {"align": False},
}


def single_skip(num_layers: int, layer: int) -> list[int]:
    return [0 if i == layer else 1 for i in range(num_layers)]


def single_merge(num_layers: int, layer: int) -> list[int]:
    return [2 if i == layer else 1 for i in range(num_layers)]


def measure(base: EvaluatorConfig, calib_steps: int) -> list[dict]:
    started = time.perf_counter()
    plain = ModelEvaluator(base)
    n = plain.num_layers
    dense, *skips = plain.evaluate([[1] * n] + [single_skip(n, i) for i in range(n)])
    merges = {"merge_mean": plain.evaluate([single_merge(n, i) for i in range(1, n)])}
    calibrated_skips = ModelEvaluator(EvaluatorConfig(**{**base.to_dict(), "calib_steps": calib_steps}))
    skips_calib = calibrated_skips.evaluate([single_skip(n, i) for i in range(n)])
    del plain, calibrated_skips
    for column, change in SETTINGS.items():
        if column == "merge_mean":
            continue
        change = {k: (calib_steps if k == "calib_steps" else v) for k, v in change.items()}
        evaluator = ModelEvaluator(EvaluatorConfig(**{**base.to_dict(), **change}))
        merges[column] = evaluator.evaluate([single_merge(n, i) for i in range(1, n)])
        del evaluator
    rows = []
    for i in range(n):
        row = {"layer": i, "dense": dense.perplexity, "skip": skips[i].perplexity, "skip_calib": skips_calib[i].perplexity}
        for column, values in merges.items():
            row[column] = values[i - 1].perplexity if i > 0 else None
        rows.append(row)
    print(f"measured {len(rows)} layers in {time.perf_counter() - started:.0f} s")
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
                           score_tokens=args.score_tokens)
    rows = measure(base, args.calib_steps)
    columns = ["layer", "dense", "skip", "skip_calib", *SETTINGS]
    save_results("layer_sensitivity", {"settings": base.to_dict(), "calib_steps": args.calib_steps, "rows": rows},
                 rows, columns)
    plot(rows, rows[0]["dense"], RESULTS / "layer_sensitivity.png")


if __name__ == "__main__":
    main()
