"""Depth against width at equal size: which structure to remove from SmolLM2-135M, and how it heals.

At each budget (a share of the decoder parameters equal to N of the 30 layers: 8 -> 26.7 %,
12 -> 40 %) every method removes the same number of parameters:
- width, global: `python -m ga.width` with each importance (taylor, taylor2, wanda);
- width, uniform: the same number of units from every layer (taylor importance);
- depth, GA: the GA's best chromosome at that budget (lowest calibration fitness over the seeds
  of `experiments/results/search_quality-seams.json`), seam-repaired as it was searched;
- depth then width: the GA (`python -m ga.run`, its defaults, --max-evals like the comparison's
  80) chooses half the layers, repaired, and width (taylor) trims the kept layers to the same
  total.
Each plan is exported by `finetune.heal` (the product's own path) and measured on the first
--heldout-tokens (64 windows of 1,024) of WikiText-2 test and PTB test, raw, and, for the
methods in --heal (all by default), after the same --heal-steps of healing with the default
plan (qv).

    python -m experiments.depth_vs_width --data-dir ../shared/data --threads 2 --budgets 8,12

Every finished (budget, method) is kept under --work, so an interrupted run continues, and the
results hold exactly the runs made. The width passes run as subprocesses, so each one's peak
memory is its own. Results: experiments/results/<output>.{json,csv,md}.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from chromosomes import ChromosomeRecord, write_json_atomic
from evaluators.text import REPORT_TEXTS
from experiments.report import RESULTS, save_results
from finetune.config import HealConfig
from finetune.heal import prepare, run

MODEL = "smollm2-135m"
LAYERS = 30


def width_plan(importance: str, uniform: bool = False) -> Callable[[argparse.Namespace, int, Path], Path]:
    def plan(args: argparse.Namespace, removed: int, folder: Path, depth: Path | None = None) -> Path:
        command = [sys.executable, "-m", "ga.width", "--model", MODEL, "--params", f"{removed / LAYERS!r}",
                   "--importance", importance, "--out", str(folder), "--threads", str(args.threads),
                   "--no-progress", "--replace", *(["--uniform"] if uniform else []),
                   *(["--data-dir", args.data_dir] if args.data_dir else []),
                   *(["--chromosome", str(depth)] if depth else [])]
        subprocess.run(command, check=True)
        return folder / "best.json"
    return plan


def ga_depth(args: argparse.Namespace, removed: int, folder: Path) -> Path:
    """The GA's pick at this budget: its best calibration fitness over the seeds of the repaired comparison."""
    rows = json.loads((RESULTS / "search_quality-seams.json").read_text())["rows"]
    best = min((r for r in rows if r["method"] == "ga-importance" and r["removed"] == removed), key=lambda r: r["fitness"])
    path = folder / "best.json"
    ChromosomeRecord(tuple(best["genes"]), MODEL, LAYERS, extra={"source": f"search_quality-seams seed {best['seed']}"}).save(path)
    return path


def depth_then_width(args: argparse.Namespace, removed: int, folder: Path) -> Path:
    """The GA's pick of half the layers (seed 0, --ga-evals evaluations), the rest of the budget by width."""
    run = folder / "depth-ga"
    where = ["--resume", str(run)] if (run / "config.json").is_file() else ["--out", str(folder), "--name", run.name]
    if not (run / "summary.json").is_file():
        subprocess.run([sys.executable, "-m", "ga.run", *where, "--model", MODEL, "--remove", str(removed // 2),
                        "--max-evals", str(args.ga_evals), "--seed", "0", "--workers", "local",
                        "--threads", str(args.threads), "--no-progress",
                        *(["--data-dir", args.data_dir] if args.data_dir else [])], check=True)
    return width_plan("taylor")(args, removed, folder, run / "best.json")


METHODS: dict[str, Callable[..., Path]] = {
    "width global taylor": width_plan("taylor"),
    "width global taylor2": width_plan("taylor2"),
    "width global wanda": width_plan("wanda"),
    "width uniform taylor": width_plan("taylor", uniform=True),
    "depth GA": ga_depth,
    "depth then width": depth_then_width,
}


def measure(args: argparse.Namespace, plan: Path, folder: Path, steps: int) -> dict[str, Any]:
    """Held-out perplexity before (and after `steps` of) healing, through finetune.heal."""
    config = HealConfig(steps=steps, warmup=max(1, steps // 8) if steps else 20, batch_size=4, grad_accum=1,
                        lr=1e-3, seq_len=512, eval_tokens=args.heldout_tokens, eval_seq_len=1024,
                        eval_texts=",".join(REPORT_TEXTS), device="cpu", data_dir=args.data_dir,
                        checkpoint_every=0, efficiency=False)
    report = run(prepare(plan, config, folder, replace=True), progress=False)
    row: dict[str, Any] = {f"{t} raw": report["before"][t]["perplexity"] for t in REPORT_TEXTS}
    if report["after"] is not None:
        row.update({f"{t} healed": report["after"][t]["perplexity"] for t in REPORT_TEXTS})
        row["heal steps"] = steps
    return row


def run_method(args: argparse.Namespace, removed: int, method: str) -> dict[str, Any]:
    work = Path(args.work) / f"r{removed}-{method.replace(' ', '-')}"
    done = work / "result.json"
    heal = method in args.heal.split(",")
    if done.is_file():
        result = json.loads(done.read_text())
        if not heal or "heal steps" in result:
            return result
    started = time.perf_counter()
    plan = Path(json.loads(done.read_text())["plan"]) if done.is_file() else METHODS[method](args, removed, work)
    record = ChromosomeRecord.load(plan)
    width = record.extra.get("width", {})
    result = {"removed": removed, "method": method, "plan": str(plan),
              "removed share": width.get("removed_share", record.removed / LAYERS), "layers removed": record.removed,
              "importance s": width.get("importance_seconds"),
              **{f"importance {what} GiB": width[f"importance_{what}_bytes"] / 2**30 if f"importance_{what}_bytes"
                 in width else None for what in ("peak", "base")},
              "calibration ppl": (record.fitness or {}).get("perplexity"),
              **measure(args, plan, work / "model", args.heal_steps if heal else 0),
              "seconds": time.perf_counter() - started}
    write_json_atomic(done, result)
    print(" ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()), flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.depth_vs_width", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--budgets", default="8,12", help="layers' worth of decoder parameters removed, comma-separated")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"any of: {', '.join(METHODS)}")
    parser.add_argument("--heal", default=",".join(METHODS),
                        help="methods also measured after healing, comma-separated")
    parser.add_argument("--heal-steps", type=int, default=16, help="healing steps (qv plan, 4 x 512 tokens a step)")
    parser.add_argument("--heldout-tokens", type=int, default=65536, help="tokens of each test text")
    parser.add_argument("--ga-evals", type=int, default=80, help="fitness evaluations of the GA in depth then width")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="runs/depth_vs_width")
    parser.add_argument("--output", default="depth_vs_width")
    parser.add_argument("--collect", action="store_true", help="only gather the finished runs under --work")
    args = parser.parse_args(argv)
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        parser.error(f"unknown method(s): {', '.join(sorted(unknown))}")
    import torch
    torch.set_num_threads(args.threads)
    if not args.collect:
        for removed in (int(b) for b in args.budgets.split(",")):
            for method in args.methods.split(","):
                run_method(args, removed, method)
    rows = [json.loads(p.read_text()) for p in sorted(Path(args.work).glob("r*/result.json"))]
    rows.sort(key=lambda r: (r["removed"], list(METHODS).index(r["method"])))
    columns = ["removed", "method", "removed share", "layers removed", "calibration ppl",
               *[f"{t} {s}" for s in ("raw", "healed") for t in REPORT_TEXTS], "heal steps",
               "importance s", "importance peak GiB", "importance base GiB"]
    settings = {k: v for k, v in vars(args).items() if k != "collect"}
    save_results(args.output, {"settings": settings, "rows": rows}, rows, columns)


if __name__ == "__main__":
    main()
