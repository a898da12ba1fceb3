"""`python -m finetune.best --chromosome best.json`: heal the model a GA chromosome describes.

Cuts the base model to the chromosome (the search's own surgery, merges included), trains LoRA
and/or the RMSNorm weights on the calibration text, and measures held-out perplexity before
and after. The output folder (default: healed-<plan> beside the chromosome file) holds:

  the merged model    a standard Hugging Face folder with the tokenizer (from_pretrained, generate)
  adapter/            the peft adapter alone, trained norm weights included (not with --steps 0
                      or --plan tail, which trains the model's own weights)
  chromosome.json     the chromosome: with adapter/ it rebuilds the model
  settings.json       the settings of this command: a valid --config
  report.json         perplexity before and after, every setting, parameter counts, timing, and
                      size and prefill/decode speed against the dense model (--efficiency)
  tb/                 TensorBoard curves

With --steps 0 the compact model (merged and seam-repaired as the chromosome file records, or as
--repair says) is exported untrained, and measured only with --measure (`gaprune export`).

The run is built in a hidden staging folder beside the output (.<name>.partial) and renamed
into place at the end; it holds checkpoints every --checkpoint-every steps, and
--resume OUT_DIR (the same settings otherwise) continues an interrupted run to the same weights.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from finetune.config import RESUMABLE, HealConfig
from gaprune.options import (
    add_config_arguments, add_run_file_arguments, config_from_args, fail, interrupt_status, parse_with_run_file,
    print_run_file, resumed_folder, terminate_like_interrupt,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m finetune.best", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: python -m finetune.best --chromosome runs/ga-1/best.json --plan wide --steps 400")
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--chromosome", metavar="BEST_JSON", default=None,
                           help="chromosome file written by the search (python -m ga.run); required")
    run_group.add_argument("--out", metavar="OUT_DIR", default=None,
                           help="the output folder to write (default: healed-<plan>, or compact with --steps 0, "
                                "beside the chromosome file)")
    run_group.add_argument("--replace", action="store_true",
                           help="replace an existing output folder (atomically, once the new run is complete)")
    run_group.add_argument("--resume", metavar="OUT_DIR", default=None,
                           help="continue the interrupted run that writes OUT_DIR from its last checkpoint; the "
                                "settings must be the same (only "
                                + ", ".join(f"--{name.replace('_', '-')}" for name in sorted(RESUMABLE))
                                + " may change)")
    run_group.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                           help="show progress bars")
    add_config_arguments(parser, HealConfig, "healing")
    add_run_file_arguments(parser)
    return parser


def output_folder(args: argparse.Namespace, config: HealConfig) -> Path:
    """The folder this command writes: --resume's, --out, or named after the plan beside the chromosome."""
    if args.resume:
        return resumed_folder(args.resume, args.out)
    return Path(args.out) if args.out else default_out(args.chromosome, config)


def run_settings(args: argparse.Namespace, config: HealConfig) -> dict[str, dict[str, Any]]:
    """This command's settings as a run file: what --print-config prints and settings.json keeps."""
    return {"run": {"chromosome": args.chromosome}, "healing": config.to_dict()}


def default_out(chromosome: str | Path, config: HealConfig) -> Path:
    return Path(chromosome).parent / ("compact" if config.steps == 0 else f"healed-{config.plan}")


def summary(report: dict[str, Any], out: Path) -> str:
    layers, training = report["layers"], report["training"]
    repair = report["surgery_settings"]["repair"]
    if report["after"] is None:
        lines = [f"exported the {layers['compact']}-layer model ({layers['removed']} of {layers['base']} layers "
                 f"removed, repair {repair}) untrained"]
    else:
        lines = [f"healed {layers['compact']}-layer model ({layers['removed']} of {layers['base']} layers removed, "
                 f"repair {repair}), plan {report['config']['plan']}, {training['steps']} steps in "
                 f"{training['seconds']:.1f} s"]
    if not report["before"]:
        lines.append("  not measured: add --measure for held-out perplexity and speed against the dense model")
    width = max((len(name) for name in report["before"]), default=0)
    for name, before in report["before"].items():
        after = "" if report["after"] is None else f" -> {report['after'][name]['perplexity']:10.3f}"
        lines.append(f"  {name:<{width}}  perplexity {before['perplexity']:10.3f}{after}")
    from finetune.efficiency import efficiency_lines
    from finetune.zero_shot import score_lines

    if report["zero_shot"] is not None:
        lines.append("lm-eval zero-shot" + ("" if report["after"] is None else ", before -> after healing") + ":")
        lines += score_lines(report["zero_shot"]["before"], report["zero_shot"]["after"])
    if report["efficiency"] is not None:
        lines.append("compact against dense, measured side by side:")
        lines += efficiency_lines(report["efficiency"])
    contents = "model, chromosome.json, settings.json, report.json, tb/" if report["training"]["steps"] == 0 or \
        report["config"]["plan"] == "tail" else "merged model, adapter/, chromosome.json, settings.json, report.json, tb/"
    lines.append(f"wrote {out}: {contents}")
    if report["loads_with"] == "gaprune":
        lines.append("  its layers differ, which its config says in per_layer_config: load it with "
                     "evaluators.export.load_pruned (transformers does not build such layers yet)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, _ = parse_with_run_file(parser, list(sys.argv[1:] if argv is None else argv))
    if args.chromosome is None:
        parser.error("--chromosome is required (on the command line or in --config)")
    try:  # settings first: a wrong one is answered before torch or the model load
        config = config_from_args(HealConfig, args)
        out = output_folder(args, config)
    except ValueError as error:
        fail(str(error))
    if args.print_config:
        print_run_file(run_settings(args, config))
        return 0
    from evaluators.models import ModelLoadError
    from finetune.checkpoint import CheckpointError, read_state
    from finetune.heal import prepare, run
    from finetune.output import OutputError

    input_errors = (ValueError, ModelLoadError, OutputError, CheckpointError)  # one line, no traceback
    try:
        prepared = prepare(args.chromosome, config, out, replace=args.replace, resume=args.resume is not None,
                           settings=run_settings(args, config))
    except input_errors as error:
        fail(str(error))
    try:
        with terminate_like_interrupt():
            report = run(prepared, progress=args.progress)
    except KeyboardInterrupt as interrupt:
        found = read_state(prepared.folder.checkpoints)
        if found is None:
            print("\ninterrupted before the first checkpoint: nothing to resume", file=sys.stderr)
        else:
            print(f"\ninterrupted: step {found[0].step} is checkpointed in {prepared.folder.staging}\n"
                  f"continue with the same command and --resume {out}", file=sys.stderr)
        return interrupt_status(interrupt)
    except input_errors as error:
        fail(str(error))
    print(summary(report, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
