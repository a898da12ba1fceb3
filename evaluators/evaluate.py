"""`python -m evaluators.evaluate` (`gaprune evaluate`): how good a pruned model is on held-out text.

Scores a chromosome file (the compact model is cut and repaired as the search scored it) or a
folder that `gaprune export` or `gaprune heal` wrote, on named texts: perplexity, the mean
KL(dense || model) of the next-token distributions per predicted token, and top-1 agreement
(the share of tokens whose most likely next token is the dense model's). Nothing is trained or
written except the --json report; the protocol is printed beside the figures.

    python -m evaluators.evaluate --chromosome runs/ga-1/best.json
    python -m evaluators.evaluate --folder runs/ga-1/compact --texts wikitext2:test --tokens 16384
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from evaluators.config import REPAIRS, REPORT_TEXTS
from gaprune.options import (
    Settings, add_config_arguments, add_run_file_arguments, config_from_args, fail, parse_with_run_file,
    print_run_file, say,
)


@dataclass
class EvaluateConfig(Settings):
    """How a pruned model is measured (printed with the figures, saved in the --json report)."""

    kind = "evaluation setting"

    texts: str = field(default=",".join(REPORT_TEXTS), metadata={"help": "held-out texts, comma-separated: named sets or .txt files"})
    tokens: int = field(default=65536, metadata={"help": "at most this many tokens of each text, from its start, in whole windows"})
    seq_len: int = field(default=1024, metadata={"help": "tokens per window"})
    batch_size: int = field(default=4, metadata={"help": "windows per forward pass"})
    kl: bool = field(default=True, metadata={"help": "also load the dense model: KL from it and top-1 agreement with it"})
    dense: str | None = field(default=None, metadata={"help": "the dense model (default: the one the chromosome file names; a folder's own chromosome.json)"})
    repair: str | None = field(default=None, metadata={"help": "chromosome files: seam repair (default: as the file records)"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N"})
    data_dir: str | None = field(default=None, metadata={"help": "local copy of the named texts (default $GAPRUNE_DATA_DIR)"})

    def __post_init__(self) -> None:
        for name in ("tokens", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"seq_len must be an integer of at least 2, got {self.seq_len!r}")
        if self.tokens < self.seq_len:
            raise ValueError(f"tokens ({self.tokens}) must hold at least one window of seq_len ({self.seq_len})")
        if not self.text_names or any(not name for name in self.text_names):
            raise ValueError(f"texts must name at least one text, comma-separated, got {self.texts!r}")
        if self.repair is not None and self.repair not in REPAIRS:
            raise ValueError(f"repair must be one of {', '.join(REPAIRS)}, got {self.repair!r}")

    @property
    def text_names(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.texts.split(","))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluators.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("what to measure (one of)")
    what.add_argument("--chromosome", metavar="BEST_JSON", default=None, help="a chromosome file (best.json)")
    what.add_argument("--folder", metavar="MODEL_DIR", default=None,
                      help="a model folder written by gaprune export or heal (or any causal LM folder, with --dense)")
    what.add_argument("--json", metavar="FILE", default=None, help="also write the figures and settings to FILE")
    add_config_arguments(parser, EvaluateConfig, "measurement")
    add_run_file_arguments(parser)
    return parser


def protocol(config: EvaluateConfig, windows: dict[str, int]) -> str:
    counts = ", ".join(f"{name} {count} x {config.seq_len}" for name, count in windows.items())
    kl = "; KL(dense || model) per predicted token and top-1 agreement with the dense model" if config.kl else ""
    return f"first windows of each text ({counts} tokens), {config.dtype} on {config.device}{kl}"


def load_subject(args: argparse.Namespace, config: EvaluateConfig):
    """The model to measure, its tokenizer and the name of its dense model."""
    from chromosomes import ChromosomeRecord
    from evaluators.compact import build_compact, load_chromosome
    from evaluators.export import load_pruned
    from evaluators.models import resolve_device, resolve_dtype
    from transformers import AutoTokenizer

    if args.chromosome:
        record, spec = load_chromosome(args.chromosome, None)
        model, tokenizer = build_compact(record, spec, config)
        return model, tokenizer, config.dense or spec
    folder = Path(args.folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"--folder {folder}: no config.json there, so no model folder")
    recorded = folder / "chromosome.json"
    dense = config.dense or (ChromosomeRecord.load(recorded).model if recorded.is_file() else None)
    if dense is None and config.kl:
        raise ValueError(f"--folder {folder} has no chromosome.json naming its dense model: give --dense (or --no-kl)")
    device = resolve_device(config.device)
    model = load_pruned(folder, resolve_dtype(config.dtype, device), device)
    return model, AutoTokenizer.from_pretrained(folder), dense


def measure(args: argparse.Namespace, config: EvaluateConfig, progress: bool = True) -> dict[str, Any]:
    import torch

    from evaluators.models import load_model
    from evaluators.perplexity import fidelity, final_hidden, perplexity
    from evaluators.text import text_blocks

    say("loading the model to measure", progress)
    model, tokenizer, dense_name = load_subject(args, config)
    dense = None
    if config.kl:
        say(f"loading the dense model {dense_name}", progress)
        dense, _ = load_model(dense_name, config.dtype, config.device)
    figures: dict[str, dict[str, float]] = {}
    windows: dict[str, int] = {}
    with torch.no_grad():
        for name in config.text_names:
            blocks = text_blocks(name, tokenizer, config.seq_len, config.tokens, config.data_dir)
            windows[name] = blocks.shape[0]
            say(f"measuring {name} ({blocks.shape[0]} windows)", progress)
            if dense is None:
                figures[name] = {"perplexity": perplexity(model, blocks, config.batch_size)[0]}
            else:
                reference = final_hidden(dense, blocks, config.batch_size)
                figures[name] = fidelity(model, blocks, config.batch_size, reference, dense.get_output_embeddings())
    return {"measured": args.chromosome or args.folder, "dense": dense_name, "figures": figures,
            "windows": windows, "protocol": protocol(config, windows), "settings": config.to_dict(),
            "parameters": sum(p.numel() for p in model.parameters())}


def report_lines(report: dict[str, Any]) -> list[str]:
    width = max(len(name) for name in report["figures"])
    lines = [f"{report['measured']}: {report['parameters']:,} parameters"]
    for name, values in report["figures"].items():
        extra = "" if "kl" not in values else f"   KL {values['kl']:.4f}   top-1 {values['top1']:.4f}"
        lines.append(f"  {name:<{width}}  perplexity {values['perplexity']:10.3f}{extra}")
    lines.append(f"protocol: {report['protocol']}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, _ = parse_with_run_file(parser, list(sys.argv[1:] if argv is None else argv))
    if (args.chromosome is None) == (args.folder is None):
        parser.error("give one of --chromosome or --folder")
    try:
        config = config_from_args(EvaluateConfig, args)
    except ValueError as error:
        fail(str(error))
    if args.print_config:
        print_run_file({"run": {"chromosome": args.chromosome, "folder": args.folder, "json": args.json},
                        "measurement": config.to_dict()})
        return 0
    from evaluators.models import ModelLoadError

    started = time.perf_counter()
    try:
        report = measure(args, config)
    except (ValueError, ModelLoadError, OSError) as error:  # ChromosomeError and TextError are ValueErrors
        fail(str(error))
    report["seconds"] = time.perf_counter() - started
    print("\n".join(report_lines(report)))
    if args.json:
        from gaprune.files import write_json_atomic
        write_json_atomic(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
