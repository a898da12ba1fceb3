"""`python -m ga.run`: search which layers, attention and MLP sub-layers and widths to keep under a budget.

By default (--space joint) every decoder layer gets an attention width (key-value groups) and an
MLP width, either of which may be zero, under a budget of decoder parameters (--params); every
cut is repaired in closed form before it is scored. --space layers searches whole layers to
skip, keep or merge under a budget of layers (--remove or --ratio). With --gens 0 the one-shot
seed (--init) is scored alone: the one-shot global width plan, say, with --init width.

Writes the run folder (--out, default runs/ga-<date>-<time>) with config.json, checkpoint.json
(after every generation), best.json, TensorBoard logs in tb/, and at the end summary.json and
summary.png. `--resume RUN_DIR` continues a stopped run exactly; Ctrl-C and SIGTERM keep the last
checkpoint. A run folder's config.json is a valid --config for a new run.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from evaluators.config import EvaluatorConfig, saved_evaluator
from evaluators.workers import WorkerConfig
from ga.checkpoint import RunError, RunFolder
from ga.config import SearchConfig, saved_search
from gaprune.options import (
    add_config_arguments, add_run_file_arguments, fail, interrupt_status, parse_with_run_file, print_run_file, resumed_folder, say,
    terminate_like_interrupt,
)

# Settings that change how a run is computed but not what it computes: --resume may change them
# (with the worker settings, which never change a fitness).
RESUMABLE = frozenset({"gens", "max_evals", "patience", "device", "threads", "batch_size", "data_dir", "share_prefix",
                       "align_cache", "merge_cache_gb"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ga.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples: python -m ga.run --params 0.3 --fitness kl | python -m ga.run --space layers --remove 8 | "
               "python -m ga.run --init width --gens 0 (the one-shot width plan alone)")
    add_config_arguments(parser, SearchConfig, "search")
    add_config_arguments(parser, EvaluatorConfig, "fitness (model, text, calibration)")
    add_config_arguments(parser, WorkerConfig, "workers (Ray actors; none of these changes a fitness)")
    run = parser.add_argument_group("run")
    run.add_argument("--out", metavar="RUN_DIR", default=None,
                     help="the run folder to write (default: runs/ga-<date>-<time>)")
    run.add_argument("--resume", metavar="RUN_DIR", default=None,
                     help="continue the run in RUN_DIR with its saved settings; only the worker settings and "
                          + ", ".join(f"--{name.replace('_', '-')}" for name in sorted(RESUMABLE)) + " may change")
    run.add_argument("--export", action=argparse.BooleanOptionalAction, default=True,
                     help="end by writing the pick's compact model, repaired as it was scored, to RUN_DIR/compact "
                          "(the repair statistics are at hand: seconds; gaprune export rebuilds it from scratch)")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    add_run_file_arguments(parser)
    return parser


def _section(cls: type, args: argparse.Namespace, base: dict[str, Any], given: set[str]) -> dict[str, Any]:
    fields = cls.__dataclass_fields__
    return {**base, **{name: getattr(args, name) for name in fields if name in given}}


def refuse_changed_settings(args: argparse.Namespace, given: set[str], saved: dict[str, Any]) -> None:
    changed = sorted(name for name in given & set(saved) - RESUMABLE if getattr(args, name) != saved[name])
    if changed:
        details = ", ".join(f"--{name.replace('_', '-')} {getattr(args, name)!r} (run has {saved[name]!r})"
                            for name in changed)
        raise RunError(f"cannot resume {args.resume}: {details}; a resumed run keeps the settings it started with")


def plan_run(args: argparse.Namespace, given: set[str]) -> tuple[RunFolder, dict[str, Any]]:
    """The run folder and its configuration: new from the options, or the saved one with overrides."""
    if args.resume:
        try:
            folder = RunFolder(resumed_folder(args.resume, args.out))
        except ValueError as error:
            raise RunError(str(error)) from None
        saved = folder.read_config()
        search, evaluator = saved_search(saved["search"]), saved_evaluator(saved["evaluator"])
        refuse_changed_settings(args, given, {**search, **evaluator})
        config = {
            "search": _section(SearchConfig, args, search, given),
            "evaluator": _section(EvaluatorConfig, args, evaluator, given),
            "runtime": _section(WorkerConfig, args, WorkerConfig.from_dict(saved.get("runtime", {})).to_dict(), given),
        }
        return folder, config
    everything = set(vars(args))
    config = {
        "search": _section(SearchConfig, args, {}, everything),
        "evaluator": _section(EvaluatorConfig, args, {}, everything),
        "runtime": _section(WorkerConfig, args, {}, everything),
    }
    return RunFolder(Path(args.out or time.strftime("runs/ga-%Y%m%d-%H%M%S"))), config


def with_alignment_store(config: dict[str, Any], folder: RunFolder) -> dict[str, Any]:
    """Alignments go to the run folder unless --align-cache says where: actors share them, and a
    resumed run reads them back instead of aligning again."""
    evaluator = config["evaluator"]
    if evaluator.get("align_cache") is None:
        config["evaluator"] = {**evaluator, "align_cache": str(folder.path / "alignments")}
    return config


def export_pick(evaluator: Any, state: Any, folder: RunFolder, wanted: bool, progress: bool) -> dict[str, Any] | None:
    """Write the best genome's compact model into the run folder, unless asked not to or already
    there (a finished run resumed): where it is and the seconds writing it took."""
    target = folder.path / "compact"
    if not wanted:
        return None
    started = time.perf_counter()
    if not target.exists():
        say(f"writing the pick's compact model to {target}", progress)
        evaluator.export(state.best()[0], str(target), {"chromosome.json": folder.best_path.read_text()})
    return {"folder": str(target), "seconds": time.perf_counter() - started}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, given = parse_with_run_file(parser, argv)
    try:  # settings first: a wrong one is answered before torch, Ray or the model load
        folder, config = plan_run(args, given)
        config = with_alignment_store(config, folder) if not args.print_config else config
        search = SearchConfig.from_dict(config["search"])
        evaluator_config = EvaluatorConfig.from_dict(config["evaluator"])
        workers = WorkerConfig.from_dict(config["runtime"])
    except (RunError, ValueError) as error:
        fail(str(error))
    config = {"search": search.to_dict(), "evaluator": evaluator_config.to_dict(), "runtime": workers.to_dict()}
    if args.print_config:  # resolved: the defaults that depend on other settings are filled in
        print_run_file(config)
        return 0
    from evaluators.fitness import DeviceMemoryError
    from evaluators.models import ModelLoadError, skeleton
    from evaluators.text import load_text
    from evaluators.units import check_prunable
    try:
        if not args.resume:
            folder.refuse_existing()
        load_text(evaluator_config.data, evaluator_config.data_dir)  # a missing text fails before Ray starts
        if search.widths:  # a model that cannot be cut in width is refused before its weights load
            check_prunable(skeleton(evaluator_config.model))
    except (RunError, ValueError, ModelLoadError) as error:  # ChromosomeError and TextError are ValueErrors
        fail(str(error))
    from evaluators.pool import PoolError, open_evaluator  # Ray is imported only once the options are sound
    from ga.engine import check_screening, evolve, stop_reason
    from ga.problem import Problem
    from ga.summary import build_summary, summary_lines, write_summary

    provenance = {"run": folder.path.name, "search": search.to_dict(), "evaluator": evaluator_config.to_dict()}
    started = time.perf_counter()
    try:
        with terminate_like_interrupt() as stop_if_interrupted:
            say(f"loading {evaluator_config.model} ({workers.workers} workers)", args.progress)
            with open_evaluator(evaluator_config, workers) as evaluator:
                Problem.of(search, evaluator.describe())  # an impossible budget fails before the folder exists
                check_screening(search, evaluator.describe())
                if args.resume:
                    folder.write_config(config)
                else:
                    folder.create(config)
                state = evolve(evaluator, search, folder, provenance, progress=args.progress,
                               between_generations=stop_if_interrupted)
                definition = evaluator.describe()
                say("scoring the dense model for the summary", args.progress)
                dense = evaluator.evaluate([[1] * evaluator.num_layers])[0]
                exported = export_pick(evaluator, state, folder, args.export, args.progress)
    except KeyboardInterrupt as interrupt:
        print(f"\ninterrupted: every finished generation is checkpointed in {folder.checkpoint_path}\n"
              f"continue with: gaprune search --resume {folder.path}", file=sys.stderr)
        return interrupt_status(interrupt)
    except (RunError, ModelLoadError, ValueError, TimeoutError, ConnectionError, PoolError, DeviceMemoryError) as error:
        fail(str(error))
    summary = build_summary(state, definition, dense, stop_reason(state, search, definition) or "stopped",
                            time.perf_counter() - started, folder.best_path, exported)
    write_summary(summary, folder.path)
    print("\n".join(summary_lines(summary)) + f"\nwrote {folder.best_path}, summary.json and summary.png")
    return 0



if __name__ == "__main__":
    sys.exit(main())
