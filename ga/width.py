"""`python -m ga.width`: structured width pruning to a parameter budget, the GQA-aware way.

Scores every attention unit (a key-value head with the query heads that share it) and every
MLP channel on calibration text, removes the least important per parameter across all layers
until --params of the dense model's decoder parameters are gone (or, with --uniform, the same
number of units of each kind from every layer), and measures the result's calibration
perplexity on the windows the GA scores on. With --chromosome, the layers that chromosome keeps
(merged and seam-repaired as its file records) are trimmed instead, so that depth and width
share one budget.

Writes OUT/best.json: the chromosome record with `units` (per kept layer, the units it keeps),
its calibration perplexity, the parameter counts, and the time and peak memory of the
importance pass. `python -m finetune.best --chromosome OUT/best.json` heals and exports it.
"""
from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from chromosomes import ChromosomeRecord
from chromosomes.width import Unit, kept_units, select_global, select_uniform, without_empty_layers
from evaluators.cli import Settings, add_config_arguments, config_from_args, fail, say
from evaluators.fitness import EvaluatorConfig, ModelEvaluator
from evaluators.models import ModelLoadError, decoder_layers
from evaluators.perplexity import perplexity
from evaluators.text import text_blocks
from evaluators.width import IMPORTANCE, prune_width, unit_importance

# Evaluator settings that mean nothing here: width pruning scores no GA fitness.
UNUSED = ("calib_steps", "calib_batch", "calib_lr", "merge_rule", "align", "align_tokens", "align_method",
          "align_cache", "merge_cache_gb", "repair",
          "repair_tokens", "repair_inputs", "repair_ridge", "repair_min_run", "fitness", "share_prefix")


@dataclass
class WidthConfig(Settings):
    """What to remove and how to rank it (saved in best.json)."""

    kind = "width setting"

    params: float = field(default=0.25, metadata={"help": "share of the dense model's decoder parameters to remove, "
                                                          "layers removed by --chromosome included"})
    importance: str = field(default="taylor", metadata={"help": "taylor (|w * grad|), taylor2 (diagonal Fisher: w^2 * "
                                                                "grad^2 / 2) or wanda (|w| * input norm)"})
    uniform: bool = field(default=False, metadata={"help": "remove the same number of attention units and of MLP "
                                                           "channels from every layer (Minitron-style) instead of "
                                                           "choosing globally"})
    floor: float = field(default=0.0, metadata={"help": "global selection keeps at least this share of each "
                                                        "layer's attention units and of its MLP channels"})
    importance_tokens: int = field(default=8192, metadata={"help": "calibration tokens the importance is "
                                                                   "accumulated over (after the scoring windows)"})
    accumulate: str = field(default="device", metadata={"help": "where the fp32 importance sums live: device, or "
                                                                "cpu when the device is short of memory"})

    def __post_init__(self) -> None:
        if not 0 < self.params < 1:
            raise ValueError(f"params must be a share between 0 and 1, got {self.params!r}")
        if self.importance not in IMPORTANCE:
            raise ValueError(f"importance must be one of {', '.join(IMPORTANCE)}, got {self.importance!r}")
        if not 0 <= self.floor < 1:
            raise ValueError(f"floor must be a share in [0, 1), got {self.floor!r}")
        if self.uniform and self.floor:
            raise ValueError("floor applies to global selection; --uniform already keeps every layer alike")
        if self.importance_tokens <= 0:
            raise ValueError(f"importance_tokens must be positive, got {self.importance_tokens!r}")
        if self.accumulate not in ("device", "cpu"):
            raise ValueError(f"accumulate must be device or cpu, got {self.accumulate!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ga.width", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: python -m ga.width --params 0.25 --importance taylor --out runs/width-25")
    add_config_arguments(parser, WidthConfig, "width")
    add_config_arguments(parser, EvaluatorConfig, "model and text", skip=UNUSED)
    run = parser.add_argument_group("run")
    run.add_argument("--chromosome", metavar="BEST_JSON", default=None,
                     help="a depth chromosome (python -m ga.run) whose kept layers to trim (default: the dense model)")
    run.add_argument("--out", required=True, help="run folder for best.json")
    run.add_argument("--replace", action="store_true", help="replace an existing best.json in --out")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="say what is happening")
    return parser


def evaluator_settings(args: argparse.Namespace, depth: ChromosomeRecord | None) -> EvaluatorConfig:
    """This command's model and text settings; a depth chromosome's merge and repair settings as recorded."""
    given = config_from_args(EvaluatorConfig, args)
    saved = (depth.extra.get("evaluator") if depth else None) or {"repair": "none" if depth is None else "lsq"}
    return replace(EvaluatorConfig.from_dict(saved), **{k: getattr(given, k) for k in
                                                        ("model", "data", "data_dir", "seq_len", "score_tokens",
                                                         "batch_size", "dtype", "device", "threads")})


def decoder_parameters(model) -> int:
    return sum(p.numel() for layer in decoder_layers(model) for p in layer.parameters())


def floors_for(units: Sequence[Unit], share: float) -> dict[tuple[int, str], int]:
    counts: dict[tuple[int, str], int] = {}
    for unit in units:
        counts[(unit.layer, unit.kind)] = counts.get((unit.layer, unit.kind), 0) + 1
    return {key: math.ceil(share * count) for key, count in counts.items()}


def memory_in_use(device: torch.device) -> int:
    """Bytes held now: the device's allocations on a GPU (its peak count restarts here), the
    process's resident set on a CPU."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    import psutil

    return psutil.Process().memory_info().rss


def peak_memory_bytes(device: torch.device, before: int) -> int:
    """Peak memory since `memory_in_use` said `before`: the device's allocations on a GPU; on a
    CPU the process's peak resident set (the pass is the largest thing it does, so this is the
    pass's peak; the kernel updates that figure lazily, so it is no less than what was seen)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, before, memory_in_use(device))


def width_plan(width: WidthConfig, settings: EvaluatorConfig, depth: ChromosomeRecord | None,
               progress: bool) -> ChromosomeRecord:
    """Score, select, cut and measure: the width plan as a chromosome record."""
    evaluator = ModelEvaluator(settings)
    dense_decoder = decoder_parameters(evaluator.model)
    genes = depth.genes if depth else (1,) * evaluator.num_layers
    say(f"cutting {evaluator.num_layers - sum(g == 1 for g in genes)} layers as the chromosome says" if depth
        else "using the dense model", progress)
    model = evaluator.compact(genes)
    budget = math.ceil(width.params * dense_decoder) - (dense_decoder - decoder_parameters(model))
    if budget <= 0:
        raise ValueError(f"the chromosome already removes {1 - decoder_parameters(model) / dense_decoder:.1%} of the "
                         f"decoder parameters, at least --params {width.params}")
    text = text_blocks(settings.data, evaluator.tokenizer, settings.seq_len, data_dir=settings.data_dir)
    windows = math.ceil(width.importance_tokens / settings.seq_len)
    calibration = text[settings.score_blocks:settings.score_blocks + windows]
    device = next(model.parameters()).device
    say(f"{width.importance} importance of every unit on {calibration.numel():,} calibration tokens", progress)
    before, started = memory_in_use(device), time.perf_counter()
    units = unit_importance(model, calibration, settings.batch_size, width.importance,
                            torch.device("cpu") if width.accumulate == "cpu" else None)
    seconds = time.perf_counter() - started
    peak = peak_memory_bytes(device, before)
    say(f"selecting {budget:,} parameters to remove ({'uniform' if width.uniform else 'global'})", progress)
    removed = select_uniform(units, budget) if width.uniform else select_global(units, budget, floors_for(units, width.floor))
    keep = kept_units(units, removed, len(decoder_layers(model)))
    prune_width(model, keep)
    final_genes, final_units = without_empty_layers(genes, keep)
    say("measuring calibration perplexity", progress)
    ppl, nll = perplexity(model, evaluator.split.score, settings.batch_size)
    left = decoder_parameters(model)
    measured = {"perplexity": ppl, "nll": nll, "tokens": evaluator.split.score.numel() - evaluator.split.score.shape[0],
                "seq_len": settings.seq_len, "data": settings.data}
    extra: dict[str, Any] = {
        "evaluator": settings.to_dict(),
        "width": {**width.to_dict(), "depth_chromosome": depth.extra.get("run") if depth else None,
                  "dense_decoder_parameters": dense_decoder, "decoder_parameters": left,
                  "removed_share": 1 - left / dense_decoder, "units_removed": len(removed),
                  "importance_seconds": seconds, "importance_peak_bytes": peak,
                  "importance_base_bytes": before},
    }
    return ChromosomeRecord(final_genes, settings.model, evaluator.num_layers, measured, extra, final_units)


def summary_lines(record: ChromosomeRecord) -> list[str]:
    w = record.extra["width"]
    heads = [len(u.kv_heads) for u in record.units or ()]
    channels = [len(u.channels) for u in record.units or ()]
    return [f"removed {w['removed_share']:.1%} of the decoder parameters ({w['dense_decoder_parameters']:,} -> "
            f"{w['decoder_parameters']:,}); {record.removed} of {record.num_layers} layers gone",
            f"key-value heads per layer {min(heads)}-{max(heads)}, MLP channels {min(channels)}-{max(channels)}",
            f"calibration perplexity {record.fitness['perplexity']:.2f} ({record.fitness['tokens']:,} tokens); "
            f"{w['importance']} importance took {w['importance_seconds']:.1f} s, peak memory "
            f"{w['importance_peak_bytes'] / 2**30:.2f} GiB ({w['importance_base_bytes'] / 2**30:.2f} GiB in use "
            "before it)"]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out) / "best.json"
    try:
        width = config_from_args(WidthConfig, args)
        depth = ChromosomeRecord.load(args.chromosome) if args.chromosome else None
        if depth is not None and depth.units is not None:
            raise ValueError(f"{args.chromosome} is already a width plan; give a depth chromosome")
        settings = evaluator_settings(args, depth)
        if out.exists() and not args.replace:
            raise ValueError(f"{out} exists: choose another --out, or pass --replace")
        say(f"loading {settings.model}", args.progress)
        record = width_plan(width, settings, depth, args.progress)
    except (ValueError, ModelLoadError) as error:  # ChromosomeError, TextError and WidthError are ValueErrors
        fail(str(error))
    record.save(out)
    print("\n".join(summary_lines(record)) + f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
