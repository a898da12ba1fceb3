"""Do merge blocks earn their place once every seam is repaired? Dev text only.

Seam repair treats a layer merged into its anchor like a removed one: the kept block before a
merge run gets a least-squares map towards the dense state after it. For every chromosome with
MERGE genes that the repaired searches chose (the rows under --work), this scores the chromosome
as chosen and with each MERGE turned into a SKIP (the same layers removed, nothing fused), both
repaired and raw, on the calibration fitness and on the first --dev-tokens of each dev text.

    python -m experiments.merge_repair --data-dir ../shared/data --threads 1
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from chromosomes import Gene, from_string
from evaluators.config import DEV_TEXTS, EvaluatorConfig
from evaluators.fitness import ModelEvaluator
from evaluators.text import text_blocks
from experiments.report import save_results


def merged_chromosomes(works: Sequence[Path]) -> list[str]:
    """Distinct chromosomes with MERGE genes among the finished runs' picks."""
    picks = (json.loads(path.read_text())["chromosome"] for work in works for path in sorted(work.glob("r*-*/*.json")))
    return sorted({genes for genes in picks if str(int(Gene.MERGE)) in genes})


def as_skips(genes: str) -> str:
    return genes.replace(str(int(Gene.MERGE)), str(int(Gene.SKIP)))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.merge_repair", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--work", default="runs/search_quality-seams,runs/search_quality-repaired",
                        help="search_quality's per-run results folders, comma-separated")
    parser.add_argument("--dev-tokens", type=int, default=16384, help="tokens of each dev text")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--output", default="merge_repair")
    args = parser.parse_args(argv)

    chromosomes = merged_chromosomes([Path(work) for work in args.work.split(",")])
    if not chromosomes:
        parser.error(f"no chromosome with MERGE genes under {args.work}")
    rows: list[dict[str, Any]] = []
    for repair in ("lsq", "none"):
        evaluator = ModelEvaluator(EvaluatorConfig(model=args.model, data_dir=args.data_dir, threads=args.threads,
                                                   repair=repair))
        dev = {name: text_blocks(name, evaluator.tokenizer, 1024, args.dev_tokens, args.data_dir) for name in DEV_TEXTS}
        for chosen in chromosomes:
            for variant, genes in (("merge", chosen), ("skip", as_skips(chosen))):
                fitness, = evaluator.evaluate([from_string(genes)])
                row = {"chromosome": chosen, "variant": variant, "genes": genes, "repair": repair,
                       "fitness": fitness.value, **evaluator.heldout(from_string(genes), dev)}
                print(" ".join(f"{key} {value:.2f}" if isinstance(value, float) else f"{key} {value}"
                               for key, value in row.items()), flush=True)
                rows.append(row)
        del evaluator
    columns = ["chromosome", "variant", "repair", "fitness", *DEV_TEXTS]
    save_results(args.output, {"settings": vars(args), "rows": rows}, rows, columns)


if __name__ == "__main__":
    main()
