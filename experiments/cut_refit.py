"""Does a refit on the cut model pay where the search's refit stops?

The search refits each narrowed sub-layer's output projection on the dense model's inputs, to
the layer's own dense output, so every fit is shared by all genomes that narrow that layer the
same way; the errors of the layers before it stay. Refitted instead in order on what the cut
model so far feeds it, to the dense stream past any seam (`SeamRepairer.refit_on_cut`), a
genome's fits are its own (one forward of its layers over the repair tokens per genome), and
they also correct what the layers before them got wrong; a second variant refits every kept
layer's projections that way too. For each pick of a `search_quality` benchmark at one
budget, dev perplexity of the benchmark's own repair (from its results file) against both:
dev text only, the test text is not read.

    python -m experiments.cut_refit --data-dir ../shared/data --share 0.4
"""
from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from typing import Any, Sequence

from evaluators.config import DEV_TEXTS, EvaluatorConfig
from experiments.report import RESULTS, save_results
from gaprune.options import add_config_arguments

VARIANTS = (("narrowed sub-layers, on the cut model", False), ("every kept sub-layer, on the cut model", True))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.cut_refit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", default="search_quality-obs", metavar="STEM",
                        help="the search_quality results whose picks are refitted, with its evaluator settings")
    parser.add_argument("--share", type=float, default=0.4, help="the budget, as search_quality names it")
    parser.add_argument("--methods", default="width-oneshot,ga-joint", help="whose picks, comma-separated")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--dev-tokens", type=int, default=16384, help="tokens of each dev text (the benchmark's)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--output", default=None, help="stem under experiments/results (default: cut_refit-p<share>)")
    add_config_arguments(parser, EvaluatorConfig, "where to score (the benchmark's dtype is kept)", only=("device",))
    args = parser.parse_args(argv)

    from chromosomes import from_string
    from evaluators.fitness import ModelEvaluator
    from evaluators.perplexity import perplexity
    from evaluators.surgery import layer_view
    from evaluators.text import text_blocks

    benchmark = json.loads((RESULTS / f"{args.benchmark}.json").read_text())
    saved = EvaluatorConfig.from_saved(benchmark["evaluator"])
    evaluator = ModelEvaluator(replace(saved, data_dir=args.data_dir, threads=args.threads, device=args.device,
                                       align_cache=None))
    repairer = evaluator.builder.repairer
    if repairer is None:
        raise SystemExit(f"{args.benchmark} repaired nothing (--repair none): there is no refit to compare")
    dev = {name: text_blocks(name, evaluator.tokenizer, 1024, args.dev_tokens, args.data_dir) for name in DEV_TEXTS}
    picks = [row for row in benchmark["rows"] if round(row["share"], 4) == round(args.share, 4)
             and row["method"] in args.methods.split(",") and row.get("repair", saved.repair) == saved.repair]
    if not picks:
        raise SystemExit(f"{args.benchmark} has no pick of {args.methods} at share {args.share}")
    rows: list[dict[str, Any]] = []
    for pick in picks:
        source = pick["method"] + ("" if pick["seed"] is None else f" s{pick['seed']}")
        measured = {name: pick[name] for name in DEV_TEXTS}
        rows.append({"pick": source, "refit": "the benchmark's (dense inputs, own output)", **measured,
                     "dev mean": statistics.mean(measured.values()), "chromosome": pick["chromosome"]})
        stack = evaluator.stack(from_string(pick["chromosome"]))
        for variant, whole_layers in VARIANTS:
            refitted = repairer.refit_on_cut(stack, whole_layers)
            with layer_view(evaluator.model, refitted.modules, refitted.layer_types):
                figures = {name: perplexity(evaluator.model, blocks, evaluator.batch_size)[0] for name, blocks in dev.items()}
            rows.append({"pick": source, "refit": variant, **figures, "dev mean": statistics.mean(figures.values()),
                         "chromosome": pick["chromosome"]})
            print({k: v for k, v in rows[-1].items() if k != "chromosome"}, flush=True)
    save_results(args.output or f"cut_refit-p{args.share:.4f}", {"settings": vars(args), "rows": rows}, rows,
                 ["pick", "refit", *DEV_TEXTS, "dev mean"])


if __name__ == "__main__":
    main()
