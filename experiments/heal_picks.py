"""Heal the picks of a search-quality benchmark the same way, and measure them before and after.

    python -m experiments.heal_picks --data-dir ../shared/data

For each budget of an `experiments.search_quality` results file (--results) and each named method
(--methods), the pick is chosen without held-out text: the seed whose calibration fitness is
lowest (a one-shot method has one). Every pick is then rebuilt from its genome with the
benchmark's own evaluator settings (same repair, same ranking, the alignments it stored) and
healed by `finetune.heal` with one configuration for all: --steps of the qv plan (LoRA on q/v plus
the norms) on the calibration text, 4 windows of 512 tokens a step, peak learning rate 1e-3.
Held-out perplexity is measured before and after on the first --heldout-tokens (64 windows of
1,024) of WikiText-2 test and PTB test, the benchmark's own protocol, so the "before" column must
match the benchmark's training-free figures: the table shows both.

Each finished pick is kept under --work, so an interrupted run continues where it stopped; the
healed models themselves are discarded. Results: experiments/results/<output>.{json,csv,md}.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from chromosomes import from_string
from chromosomes.record import ChromosomeRecord
from evaluators.config import REPORT_TEXTS
from experiments.report import RESULTS, save_results
from finetune.config import LOSSES, HealConfig
from finetune.heal import prepare, run
from gaprune.files import write_json_atomic


def heal_config(args: argparse.Namespace) -> HealConfig:
    """One healing configuration for every pick (the short schedule of the earlier depth-versus-width table)."""
    return HealConfig(plan="qv", steps=args.steps, warmup=max(1, args.steps // 8), batch_size=4, grad_accum=1,
                      lr=args.lr, seq_len=512, loss=args.loss, eval_tokens=args.heldout_tokens, eval_seq_len=1024,
                      eval_texts=",".join(REPORT_TEXTS), device="cpu", data_dir=args.data_dir, measure=True,
                      checkpoint_every=0, efficiency=False, seed=args.seed)


def picks(results: dict[str, Any], methods: Sequence[str]) -> list[dict[str, Any]]:
    """Per budget and method, the row of lowest calibration fitness: chosen as the search itself would."""
    chosen = []
    for share in sorted({row["share"] for row in results["rows"]}):
        for method in methods:
            rows = [row for row in results["rows"] if row["share"] == share and row["method"] == method]
            if rows:
                chosen.append(min(rows, key=lambda row: row["fitness"]))
    return chosen


def chromosome_file(row: dict[str, Any], evaluator: dict[str, Any], folder: Path) -> Path:
    """The pick as a chromosome file that carries the benchmark's evaluator settings, so that the
    rebuilt model is repaired, ranked and aligned as the benchmark's was."""
    settings = {**evaluator, "repair": row.get("repair") or evaluator["repair"]}
    genes = tuple(from_string(row["chromosome"]))  # one gene per decoder layer
    record = ChromosomeRecord(genes=genes, model=evaluator["model"], num_layers=len(genes),
                              extra={"evaluator": settings})
    path = folder / "chromosome.json"
    record.save(path)
    return path


def heal_pick(row: dict[str, Any], evaluator: dict[str, Any], config: HealConfig, work: Path) -> dict[str, Any]:
    seed = "one-shot" if row["seed"] is None else f"s{row['seed']}"
    path = work / f"p{row['share']:.4f}-{row['method']}-{seed}.json"
    if path.is_file():
        return json.loads(path.read_text())
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="heal-pick-") as scratch:
        chromosome = chromosome_file(row, evaluator, Path(scratch))
        report = run(prepare(chromosome, config, Path(scratch) / "model"), progress=False)
    result: dict[str, Any] = {"share": row["share"], "method": row["method"], "seed": row["seed"],
                              "fitness": row["fitness"], "chromosome": row["chromosome"],
                              "heal steps": config.steps, "loss": config.loss}
    for text in REPORT_TEXTS:
        result[f"{text} benchmark"] = row[text]
        result[f"{text} before"] = report["before"][text]["perplexity"]
        result[f"{text} healed"] = report["after"][text]["perplexity"]
    result.update({"train s": report["training"]["seconds"], "wall s": time.perf_counter() - started,
                   "trained parameters": report["parameters"]["trained"]})
    write_json_atomic(path, result)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.heal_picks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="search_quality-joint", help="stem of a search_quality results file")
    parser.add_argument("--methods", default="ga-joint,width-oneshot,evopress-joint",
                        help="methods whose picks are healed, in this order")
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps of every heal")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--loss", default="lm", choices=LOSSES, help="training loss")
    parser.add_argument("--seed", type=int, default=0, help="seed of every heal")
    parser.add_argument("--heldout-tokens", type=int, default=65536, help="tokens of each test text")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--work", default="runs/heal_picks", help="per-pick results")
    parser.add_argument("--output", default="heal_picks", help="stem of the files under experiments/results")
    args = parser.parse_args(argv)
    results = json.loads((RESULTS / f"{args.results}.json").read_text())
    config = heal_config(args)
    work = Path(args.work)
    rows = []
    for row in picks(results, args.methods.split(",")):
        rows.append(heal_pick(row, results["evaluator"], config, work))
        print(" ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()
                       if k != "chromosome"), flush=True)
    columns = ["share", "method", "seed", "fitness", *(f"{t} {c}" for c in ("benchmark", "before", "healed")
                                                         for t in REPORT_TEXTS),
               "heal steps", "loss", "train s", "wall s"]
    save_results(args.output, {"settings": vars(args), "evaluator": results["evaluator"], "heal": config.to_dict(),
                               "rows": rows}, rows, columns)


if __name__ == "__main__":
    main()
