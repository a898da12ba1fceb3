"""What healing time buys: dev perplexity against steps and training time, in one healing run.

    python -m experiments.heal_curve --chromosome runs/heal_loss/chromosome.json --data-dir ../shared/data

One `finetune.heal` run of --steps (the qv plan unless --plan says otherwise, 4 windows of 512
tokens a step, a cosine schedule over all the steps) measures the dev texts (the first
--dev-tokens of each, 1,024-token windows) before training, every --eval-every steps and after
it; training time at each point is summed from the run's own per-step speed, so measuring is not
counted. The intermediate points lie on the schedule of the whole run: a shorter run, whose
learning rate decays sooner, may do better at the same step. The healed model is then measured
once on the test texts (64 windows of 1,024 tokens, the protocol of the other tables).
The model folder is kept under --work. Results: experiments/results/<output>.{json,csv,md}.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from evaluators.config import DEV_TEXTS, REPORT_TEXTS
from evaluators.export import load_pruned
from evaluators.text import text_blocks
from experiments.report import save_results
from finetune.config import LOSSES, PLANS, HealConfig
from finetune.heal import prepare, run
from finetune.train import board_tag, measure


def curve(board: Path, config: HealConfig, report: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows (step, training minutes, perplexity per held-out text): before, each evaluation, after."""
    events = EventAccumulator(str(board))
    events.Reload()
    speeds = {event.step: event.value for event in events.Scalars("train/tokens_per_second")}
    texts = config.eval_text_names
    rows = [{"step": 0, "train minutes": 0.0, **{t: report["before"][t]["perplexity"] for t in texts}}]
    measured = {t: {e.step: e.value for e in events.Scalars(f"eval/{board_tag(t)}/perplexity")} for t in texts}
    for step in sorted(set(measured[texts[0]]) - {0, config.steps}):
        rows.append({"step": step, **{t: measured[t][step] for t in texts}})
    rows.append({"step": config.steps, **{t: report["after"][t]["perplexity"] for t in texts}})
    for row in rows[1:]:
        row["train minutes"] = sum(config.tokens_per_step / speeds[s] for s in speeds if s <= row["step"]) / 60
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.heal_curve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chromosome", required=True, help="chromosome file of the pick to heal")
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--eval-every", type=int, default=32)
    parser.add_argument("--plan", default="qv", choices=PLANS)
    parser.add_argument("--loss", default="lm", choices=LOSSES)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--dev-tokens", type=int, default=16384, help="tokens of each dev text")
    parser.add_argument("--test-tokens", type=int, default=65536, help="tokens of each test text, after healing")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--work", default="runs/heal_curve", help="where the healed model is kept")
    parser.add_argument("--output", default="heal_curve", help="stem of the files under experiments/results")
    args = parser.parse_args(argv)
    config = HealConfig(plan=args.plan, loss=args.loss, steps=args.steps, warmup=max(1, args.steps // 16),
                        batch_size=4, grad_accum=1, lr=args.lr, seq_len=512, eval_texts=",".join(DEV_TEXTS),
                        eval_tokens=args.dev_tokens, eval_seq_len=1024, eval_every=args.eval_every, device="cpu",
                        data_dir=args.data_dir, measure=True, efficiency=False, checkpoint_every=0)
    out = Path(args.work) / f"{args.plan}-{args.loss}-{args.steps}"
    prepared = prepare(args.chromosome, config, out, replace=True)
    report = run(prepared, progress=False)
    rows = curve(out / "tb", config, report)
    healed = load_pruned(out, dtype=torch.float32)
    test = {t: text_blocks(t, prepared.tokenizer, 1024, args.test_tokens, args.data_dir) for t in REPORT_TEXTS}
    rows[-1].update({t: figures["perplexity"] for t, figures in measure(healed, test, 4, torch.float32).items()})
    for row in rows:
        print(" ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    save_results(args.output, {"settings": vars(args), "heal": config.to_dict(), "chromosome": report["chromosome"],
                               "training": report["training"], "rows": rows},
                 rows, ["step", "train minutes", *DEV_TEXTS, *REPORT_TEXTS])


if __name__ == "__main__":
    main()
