"""`python -m finetune.best --chromosome best.json`: heal the model a GA chromosome describes.

Cuts the base model to the chromosome (the search's own surgery, merges included), trains LoRA
and/or the RMSNorm weights on the calibration text, and measures held-out perplexity before
and after. The output folder (default: healed-<plan> beside the chromosome file) holds:

  the merged model    a standard Hugging Face folder with the tokenizer (from_pretrained, generate)
  adapter/            the peft adapter alone, trained norm weights included (not with --steps 0
                      or --plan tail, which trains the model's own weights)
  chromosome.json     the chromosome: with adapter/ it rebuilds the model
  report.json         perplexity before and after, every setting, parameter counts, timing, and
                      size and prefill/decode speed against the dense model (--efficiency)

With --steps 0 the compact model (merged and seam-repaired as the chromosome file records, or as
--repair says) is exported untrained.
  tb/                 TensorBoard curves

The run is built in a hidden staging folder beside the output (.<name>.partial) and renamed
into place at the end; it holds checkpoints every --checkpoint-every steps, and the same
command with --resume continues an interrupted run to the same weights.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from evaluators.cli import add_config_arguments, config_from_args, fail, interrupt_status, terminate_like_interrupt
from evaluators.models import ModelLoadError
from finetune.checkpoint import CheckpointError, read_state
from finetune.config import HealConfig
from finetune.efficiency import efficiency_lines
from finetune.heal import prepare, run
from finetune.zero_shot import score_lines
from finetune.output import OutputError

# Mistakes of the user or of the inputs: reported in one line, without a traceback.
# (ChromosomeError and TextError are ValueErrors.)
INPUT_ERRORS = (ValueError, ModelLoadError, OutputError, CheckpointError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m finetune.best", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: python -m finetune.best --chromosome runs/ga-1/best.json --plan wide --steps 400")
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--chromosome", required=True, metavar="BEST_JSON",
                           help="chromosome file written by the GA (python -m ga.run)")
    run_group.add_argument("--out", default=None,
                           help="output folder (default: healed-<plan> beside the chromosome file)")
    run_group.add_argument("--replace", action="store_true",
                           help="replace an existing output folder (atomically, once the new run is complete)")
    run_group.add_argument("--resume", action="store_true",
                           help="continue the interrupted run for this output folder from its last checkpoint; "
                                "the settings must be the same (only --checkpoint-every, --eval-every and "
                                "--data-dir may change)")
    run_group.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                           help="show progress bars")
    add_config_arguments(parser, HealConfig, "healing")
    return parser


def default_out(chromosome: str | Path, plan: str) -> Path:
    return Path(chromosome).parent / f"healed-{plan}"


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
    width = max(len(name) for name in report["before"])
    for name, before in report["before"].items():
        after = "" if report["after"] is None else f" -> {report['after'][name]['perplexity']:10.3f}"
        lines.append(f"  {name:<{width}}  perplexity {before['perplexity']:10.3f}{after}")
    if report["zero_shot"] is not None:
        lines.append("lm-eval zero-shot" + ("" if report["after"] is None else ", before -> after healing") + ":")
        lines += score_lines(report["zero_shot"]["before"], report["zero_shot"]["after"])
    if report["efficiency"] is not None:
        lines.append("compact against dense, measured side by side:")
        lines += efficiency_lines(report["efficiency"])
    contents = "model, chromosome.json, report.json, tb/" if report["after"] is None or \
        report["config"]["plan"] == "tail" else "merged model, adapter/, chromosome.json, report.json, tb/"
    lines.append(f"wrote {out}: {contents}")
    if report["loads_with"] == "gaprune":
        lines.append("  its layers differ, which its config says in per_layer_config: load it with "
                     "evaluators.export.load_pruned (transformers does not build such layers yet)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(HealConfig, args)
        out = Path(args.out) if args.out else default_out(args.chromosome, config.plan)
        prepared = prepare(args.chromosome, config, out, replace=args.replace, resume=args.resume)
    except INPUT_ERRORS as error:
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
                  "continue with the same command and --resume", file=sys.stderr)
        return interrupt_status(interrupt)
    except INPUT_ERRORS as error:
        fail(str(error))
    print(summary(report, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
