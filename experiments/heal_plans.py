"""Heal one chromosome with each plan (norm, qv, wide, tail) and each loss (lm, kd, mix), from the
raw and from the repaired cut, and tabulate dev perplexity before and after.

    python -m experiments.heal_plans --chromosome runs/<name>/best.json --data-dir ../shared/data
    python -m experiments.heal_plans --chromosome ... --plans qv --repairs lsq --losses lm,kd --equal-time

Every run calls `finetune.heal` with the same settings (only the plan, the loss and the seam
repair differ), so the table shows what repair buys before and after training at equal steps.
Distillation pays a teacher forward per step, so equal steps flatter it: --equal-time adds, for
every run with another loss, an lm run of the same plan and repair given as many steps as fit in
that run's training time at the lm run's measured pace. Held-out
text is the dev texts by default (choosing a plan is what dev text is for). Runs are on CPU
unless --device says otherwise. The defaults are sized for SmolLM2-135M (22 layers left) on 2 CPU cores:
40 steps of 4 x 512 tokens at a peak learning rate of 1e-3 (a short schedule wants a higher peak
than the CLI's 200-step default), and 8,192 tokens of each held-out text (WikiText-2 and PTB test)
before and after. A step took 36 s with the cores shared, so expect 15 (idle cores) to 30 minutes
per plan. Writes experiments/results/heal_plans-<name>.{json,csv,md}; the healed models go to
--models (default: a temporary folder, deleted at the end).
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from evaluators.config import DEV_TEXTS, REPAIRS
from evaluators.models import ModelLoadError
from experiments.report import save_results
from finetune.checkpoint import CheckpointError
from finetune.config import PLANS, HealConfig
from finetune.heal import prepare, run
from finetune.output import OutputError
from gaprune.options import fail

INPUT_ERRORS = (ValueError, ModelLoadError, OutputError, CheckpointError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.heal_plans", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chromosome", required=True, metavar="BEST_JSON", help="chromosome file from the GA")
    parser.add_argument("--plans", default=",".join(PLANS), help="plans to compare, comma-separated (default: all)")
    parser.add_argument("--losses", default="lm", help="training losses to compare, comma-separated (default: lm)")
    parser.add_argument("--equal-time", action="store_true",
                        help="also train lm for as long as each other loss's run took (needs lm among --losses)")
    parser.add_argument("--repairs", default=",".join(REPAIRS), help="seam repairs of the starting point, "
                        "comma-separated (default: none,lsq)")
    parser.add_argument("--eval-texts", default=",".join(DEV_TEXTS), help="held-out texts (default: the dev texts)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per plan (default: 40)")
    parser.add_argument("--warmup", type=int, default=4, help="warm-up steps (default: 4)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default: 4)")
    parser.add_argument("--grad-accum", type=int, default=1, help="forward passes per step (default: 1)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    parser.add_argument("--eval-tokens", type=int, default=8192,
                        help="tokens of each held-out text, before and after (default: 8192)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--data-dir", default=None, help="local copy of the named texts (default $GAPRUNE_DATA_DIR)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every plan's run (default: 0)")
    parser.add_argument("--name", default=None, help="results name (default: the chromosome file's folder name)")
    parser.add_argument("--models", default=None, help="keep the healed models in this folder (default: discard)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress bars")
    return parser


def plan_configs(args: argparse.Namespace) -> list[HealConfig]:
    """One healing configuration per repair, plan and loss, identical apart from those (validated before any run)."""
    settings = dict(steps=args.steps, warmup=args.warmup, batch_size=args.batch_size, grad_accum=args.grad_accum,
                    lr=args.lr, eval_tokens=args.eval_tokens, eval_texts=args.eval_texts, device=args.device,
                    data_dir=args.data_dir, seed=args.seed, checkpoint_every=0, efficiency=False)
    return [HealConfig(plan=plan.strip(), repair=repair.strip(), loss=loss.strip(), **settings)
            for repair in args.repairs.split(",") for plan in args.plans.split(",") for loss in args.losses.split(",")]


def equal_time_configs(configs: Sequence[HealConfig], rows: Sequence[dict[str, Any]]) -> list[HealConfig]:
    """For each run with a loss other than lm: lm on the same plan and repair, with the steps that
    fit in that run's training time at the lm run's pace (warm-up kept)."""
    pace = {(c.repair, c.plan): row["train s"] / c.steps for c, row in zip(configs, rows) if c.loss == "lm"}
    return [dataclasses.replace(c, loss="lm", steps=max(1, round(row["train s"] / pace[(c.repair, c.plan)])))
            for c, row in zip(configs, rows) if c.loss != "lm" and (c.repair, c.plan) in pace]


def table_row(report: dict[str, Any], wall_seconds: float) -> dict[str, Any]:
    row = {"repair": report["surgery_settings"]["repair"], "plan": report["config"]["plan"],
           "loss": report["config"]["loss"],
           "trained parameters": report["parameters"]["trained"],
           "steps": report["training"]["steps"], "tokens": report["training"]["tokens"]}
    for name, after in report["after"].items():
        row[f"{name} before"] = report["before"][name]["perplexity"]
        row[f"{name} after"] = after["perplexity"]
    row["train s"] = report["training"]["seconds"]
    row["wall s"] = wall_seconds
    return row


def heal_each_plan(chromosome: str, configs: Sequence[HealConfig], models: Path,
                   progress: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run every plan; returns the table rows and the full reports."""
    rows, reports = [], []
    for config in configs:
        started = time.perf_counter()
        folder = models / f"healed-{config.repair}-{config.plan}-{config.loss}-{config.steps}"
        report = run(prepare(chromosome, config, folder, replace=True), progress)
        rows.append(table_row(report, time.perf_counter() - started))
        reports.append(report)
        print(f"{config.repair} {config.plan} {config.loss}: " + ", ".join(
            f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()
            if k not in ("plan", "repair", "loss")), flush=True)
    return rows, reports


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.equal_time and "lm" not in args.losses.split(","):
        parser.error("--equal-time measures lm's pace: add lm to --losses")
    try:
        configs = plan_configs(args)
    except ValueError as error:
        fail(str(error))
    name = args.name or Path(args.chromosome).resolve().parent.name
    with tempfile.TemporaryDirectory(prefix="heal-plans-") as scratch:
        models = Path(args.models) if args.models else Path(scratch)
        try:
            rows, reports = heal_each_plan(args.chromosome, configs, models, args.progress)
            if args.equal_time:
                more_rows, more_reports = heal_each_plan(args.chromosome, equal_time_configs(configs, rows), models,
                                                         args.progress)
                rows, reports = rows + more_rows, reports + more_reports
        except INPUT_ERRORS as error:
            fail(str(error))
    first = reports[0]
    data = {"experiment": "heal_plans", "chromosome": first["chromosome"], "model": first["model"],
            "layers": first["layers"], "threads": torch.get_num_threads(), "rows": rows, "reports": reports}
    path = save_results(f"heal_plans-{name}", data, rows, list(rows[0]))
    print(f"wrote {path} and its .csv, .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
