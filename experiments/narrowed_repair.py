"""What else could repair a narrowed MLP? Two candidates beside today's refit, on dev text only.

Today a narrowed MLP keeps the channels Taylor2 ranks first, and its down_proj's kept columns are
refitted by least squares to the dense output (evaluators/repair.py). Two things that refit
leaves on the table:
- **which channels** (`obs`): Taylor2 ranks channels by what removing each costs the loss with
  nothing refitted. Ranked instead by what each costs the *refitted* output, channels are removed
  one at a time by Optimal Brain Surgeon on the layer's Gram matrix G (the refit's own statistic):
  with H^-1 = (G + ridge)^-1 and W the down_proj refitted so far, removing channel j costs
  ||W[:, j]||^2 / H^-1[j, j]; the cheapest goes, W and H^-1 are updated in closed form, and the
  order of removal, reversed, is a ranking whose every prefix is a width (ZipLM's structured OBS).
- **a mean correction** (`bias`): the refit has no intercept, so the mean of what the removed
  channels wrote is fitted only through the kept ones. Refitting with one (the Gram matrix
  augmented by the inputs' sum and the token count) gives down_proj a bias, which a Llama-family
  export cannot hold without `mlp_bias`: measured here as an upper bound of what it would buy.

Each variant cuts the same widths (the one-shot plan's, and the joint GA's seed-0 pick, from
`experiments/results/search_quality-joint.json`), with the search's repair settings, and is
measured on the first --dev-tokens of each dev text. Attention keeps Taylor2's key-value groups.

    python -m experiments.narrowed_repair --data-dir ../shared/data --threads 2
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from typing import Any, Sequence

import torch
from torch import nn

from chromosomes import from_string
from chromosomes.width import LayerUnits
from evaluators.config import DEV_TEXTS, EvaluatorConfig
from evaluators.fitness import ModelEvaluator
from evaluators.perplexity import perplexity
from evaluators.repair import removal_order, ridge_strength
from evaluators.surgery import layer_view
from evaluators.text import text_blocks
from evaluators.units import full_geometry
from experiments.report import RESULTS, save_results

VARIANTS = ("taylor2", "taylor2 + bias", "obs", "obs + bias")
PICKS = ("width-oneshot", "ga-joint")


@torch.no_grad()
def input_sums(evaluator: ModelEvaluator) -> list[tuple[torch.Tensor, int]]:
    """Per layer, the sum (fp64) and count of down_proj's dense inputs over the repair tokens,
    the tokens its Gram matrix sums over."""
    builder, family = evaluator.builder, evaluator.family
    sums: list[list[Any]] = [[0, 0] for _ in builder.dense_layers]

    def hook(index: int):
        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[index][0] = sums[index][0] + x.sum(0)
            sums[index][1] += x.shape[0]
        return record

    hooks = [family.module(layer, family.down).register_forward_pre_hook(hook(i))
             for i, layer in enumerate(builder.dense_layers)]
    try:
        for batch in builder.tune[: evaluator.config.repair_blocks].split(evaluator.batch_size):
            evaluator.model.model(input_ids=batch, use_cache=False)
    finally:
        for handle in hooks:
            handle.remove()
    return [(total, count) for total, count in sums]


def intercept_refit(gram: torch.Tensor, total: torch.Tensor, count: int, weight: torch.Tensor,
                    kept: Sequence[int], ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept columns of down_proj and a bias, the least-squares fit of the dense output."""
    k = torch.tensor(list(kept))
    g_kk = gram[k][:, k]
    strength = ridge_strength(g_kk, ridge)
    size = len(kept)
    system = torch.zeros(size + 1, size + 1, dtype=torch.float64)
    system[:size, :size] = g_kk + strength * torch.eye(size, dtype=torch.float64)
    system[:size, size] = system[size, :size] = total[k]
    system[size, size] = count
    dense = weight.double().T  # [channels, hidden]
    solved = torch.linalg.solve(system, torch.cat([gram[k] @ dense, (total @ dense)[None]]))
    return solved[:size].T, solved[size]


def with_bias(layer: nn.Module, evaluator: ModelEvaluator, kept_weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    family = evaluator.family
    old = family.module(layer, family.down)
    new = nn.Linear(old.in_features, old.out_features, bias=True, dtype=old.weight.dtype)
    new.weight.data, new.bias.data = kept_weight.to(old.weight.dtype), bias.to(old.weight.dtype)
    return family.replaced(layer, family.down, new.requires_grad_(False))


def variant_layers(evaluator: ModelEvaluator, genes: Sequence[object], variant: str, orders: dict[int, list[int]],
                   sums: list[tuple[torch.Tensor, int]]) -> tuple[list[nn.Module], Any]:
    """The genome's repaired layers, with the variant's channels and, with a bias, its refit."""
    builder = evaluator.builder
    full = full_geometry(evaluator.model)[1]
    units = list(builder.kept_units(genes))
    plan = builder.plan(genes)
    if variant.startswith("obs"):
        for position, (block, kept) in enumerate(plan):
            if kept is not None and 0 < len(kept.channels) < full:
                chosen = tuple(sorted(orders[block.anchor][:len(kept.channels)]))
                units[position] = LayerUnits(kept.kv_heads, chosen)
    stack = builder.stack(genes, units)
    modules = list(stack.modules)
    if variant.endswith("bias"):
        for position, (block, _) in enumerate(plan):
            channels = units[position].channels
            if 0 < len(channels) < full:
                layer = block.anchor
                dense = evaluator.family.module(builder.dense_layers[layer], evaluator.family.down).weight
                weight, bias = intercept_refit(builder.repairer.gram(layer, "mlp"), *sums[layer], dense, channels,
                                               evaluator.config.repair_ridge)
                modules[position] = with_bias(modules[position], evaluator, weight, bias)
    return modules, stack.layer_types


def picks(shares: Sequence[float]) -> list[tuple[float, str, str]]:
    rows = json.loads((RESULTS / "search_quality-joint.json").read_text())["rows"]
    return [(row["share"], row["method"], row["chromosome"]) for share in shares for method in PICKS
            for row in rows if row["method"] == method and abs(row["share"] - share) < 1e-6 and row["seed"] in (None, 0)]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.narrowed_repair", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--shares", default="0.26667,0.4")
    parser.add_argument("--dev-tokens", type=int, default=16384, help="tokens of each dev text")
    parser.add_argument("--output", default="narrowed_repair-dev")
    args = parser.parse_args(argv)

    saved = json.loads((RESULTS / "search_quality-joint.json").read_text())["evaluator"]
    config = replace(EvaluatorConfig.from_dict(saved), data_dir=args.data_dir, threads=args.threads,
                     align_cache=saved["align_cache"])
    evaluator = ModelEvaluator(config)
    dev = {name: text_blocks(name, evaluator.tokenizer, 1024, args.dev_tokens, args.data_dir) for name in DEV_TEXTS}
    started = time.perf_counter()
    sums = input_sums(evaluator)
    family = evaluator.family
    orders = {layer: removal_order(evaluator.builder.repairer.gram(layer, "mlp"),
                                   family.module(module, family.down).weight, config.repair_ridge)
              for layer, module in enumerate(evaluator.builder.dense_layers)}
    print(f"statistics and OBS orders: {time.perf_counter() - started:.0f} s", flush=True)
    rows = []
    for share, method, chromosome in picks([float(s) for s in args.shares.split(",")]):
        genes = from_string(chromosome)
        for variant in VARIANTS:
            modules, types = variant_layers(evaluator, genes, variant, orders, sums)
            with layer_view(evaluator.model, modules, types):
                row = {"share": share, "pick": method, "variant": variant,
                       **{name: perplexity(evaluator.model, blocks, evaluator.batch_size)[0] for name, blocks in dev.items()}}
            row["dev mean"] = sum(row[name] for name in DEV_TEXTS) / len(DEV_TEXTS)
            rows.append(row)
            print(" ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()), flush=True)
    save_results(args.output, {"settings": vars(args), "evaluator": config.to_dict(), "rows": rows}, rows,
                 ["share", "pick", "variant", *DEV_TEXTS, "dev mean"])


if __name__ == "__main__":
    main()
