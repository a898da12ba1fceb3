"""Which seam repair to use by default, chosen on dev text (never on test).

The variants: how many tokens and how much ridge; dense or pruned inputs; maps in o_proj too
(lsq-attn); a LinearPatch-style rotated channel scaling (scale); only the longer seams.

For fixed chromosomes (the one-shot removal-importance pick at 8 of 30 and the best 12-of-30
chromosome the earlier searches found), each repair variant is fitted on the calibration text
and measured on the dev texts (the second half of WikiText-2 tokenized validation and PTB
validation), with the seconds the first fit took.

    python -m experiments.repair_variants --data-dir ../shared/data --threads 2
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from chromosomes import from_string
from evaluators.config import DEV_TEXTS, EvaluatorConfig
from evaluators.fitness import ModelEvaluator
from evaluators.text import text_blocks
from experiments.report import save_results
from gaprune.files import write_json_atomic

CHROMOSOMES = {
    "r8 removal importance": "111000111111000111111111100111",
    "r12 screened GA": "111000001111000100011111101111",
}
# name -> evaluator settings that differ from ga.run's defaults
VARIANTS: dict[str, dict[str, Any]] = {
    "none": {"repair": "none"},
    "lsq 16k ridge 1e-3": {"repair_tokens": 16384, "repair_ridge": 1e-3},
    "lsq 16k ridge 1e-3 dense inputs": {"repair_tokens": 16384, "repair_ridge": 1e-3, "repair_inputs": "dense"},
    "lsq 4k ridge 1e-3": {"repair_tokens": 4096, "repair_ridge": 1e-3},
    "lsq 4k ridge 1e-1": {"repair_tokens": 4096, "repair_ridge": 1e-1},
    "lsq 16k ridge 1e-2": {"repair_tokens": 16384, "repair_ridge": 1e-2},
    "lsq 32k ridge 1e-3": {"repair_tokens": 32768, "repair_ridge": 1e-3},
    "lsq 32k ridge 1e-3 dense inputs": {"repair_tokens": 32768, "repair_ridge": 1e-3, "repair_inputs": "dense"},
    # the default above, changed in one way each
    "lsq-attn 32k dense inputs": {"repair": "lsq-attn", "repair_tokens": 32768, "repair_inputs": "dense"},
    "scale 32k dense inputs": {"repair": "scale", "repair_tokens": 32768, "repair_inputs": "dense"},
    "lsq 32k dense inputs runs of 2+": {"repair_tokens": 32768, "repair_inputs": "dense", "repair_min_run": 2},
    "lsq 32k dense inputs runs of 3+": {"repair_tokens": 32768, "repair_inputs": "dense", "repair_min_run": 3},
}


def measure(config: EvaluatorConfig, chromosomes: dict[str, str], dev_tokens: int) -> list[dict[str, Any]]:
    evaluator = ModelEvaluator(config)
    texts = {name: text_blocks(name, evaluator.tokenizer, config.seq_len, dev_tokens, config.data_dir)
             for name in DEV_TEXTS}
    rows = []
    for label, genes in chromosomes.items():
        started = time.perf_counter()
        fitness = evaluator.evaluate([from_string(genes)])[0]
        seconds = time.perf_counter() - started
        rows.append({"chromosome": label, "genes": genes, "fitness": fitness.perplexity, "first_eval_s": seconds,
                     "threads": torch.get_num_threads(),
                     **evaluator.heldout(from_string(genes), texts)})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.repair_variants", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"any of: {', '.join(VARIANTS)}")
    parser.add_argument("--dev-tokens", type=int, default=16384, help="tokens of each dev text")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--output", default="repair_variants")
    parser.add_argument("--work", default="runs/repair_variants", help="one result file per variant, reused")
    args = parser.parse_args(argv)
    rows = []
    for name in args.variants.split(","):
        done = Path(args.work) / f"{name.replace(' ', '_')}.json"
        if not done.is_file():
            config = EvaluatorConfig(data_dir=args.data_dir, threads=args.threads, **VARIANTS[name])
            write_json_atomic(done, [{"variant": name, **row} for row in measure(config, CHROMOSOMES, args.dev_tokens)])
        for row in json.loads(done.read_text()):
            rows.append(row)
            print(" ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    columns = ["variant", "chromosome", "fitness", *DEV_TEXTS, "first_eval_s", "genes"]
    save_results(args.output, {"settings": vars(args), "variants": VARIANTS, "rows": rows}, rows, columns)


if __name__ == "__main__":
    main()
