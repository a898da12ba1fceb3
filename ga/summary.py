"""What a finished search gives the user: the chromosome in words and numbers, a picture of it,
and the command that turns it into a model. Written as summary.json and summary.png in the
run folder and printed at the end of `ga.run`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from chromosomes import Gene, blocks, to_string, write_json_atomic
from evaluators.fitness import Fitness

GENE_NAMES = {Gene.SKIP: "skip", Gene.KEEP: "keep", Gene.MERGE: "merge"}


def decoder_parameters(genes: Sequence[int], layer_parameters: Sequence[int]) -> int:
    """Decoder-layer parameters the compact model keeps (a merge block has one layer's worth)."""
    return sum(layer_parameters[block.anchor] for block in blocks(genes))


def build_summary(state: Any, definition: dict[str, Any], dense: Fitness, stop: str, seconds: float,
                  best_path: Path) -> dict[str, Any]:
    """Everything the user reads at the end of a search, as plain data."""
    genes, best = state.best()
    layer_parameters = definition["layer_parameters"]
    kept = decoder_parameters(genes, layer_parameters)
    total = sum(layer_parameters)
    seed_key = state.seed
    seed = state.cache.get(seed_key) if seed_key else None
    return {
        "best": to_string(genes),
        "layers": {"base": len(genes), "compact": len(blocks(genes)),
                   "skipped": [i for i, g in enumerate(genes) if g == Gene.SKIP],
                   "merged": [i for i, g in enumerate(genes) if g == Gene.MERGE]},
        "decoder_parameters": {"dense": total, "compact": kept, "removed_share": 1 - kept / total},
        "model_parameters": {"dense": definition["total_parameters"],
                             "compact": definition["total_parameters"] - (total - kept)},
        "fitness": {"objective": best.objective, "measured_on": f"{best.tokens} tokens of {definition['data']}",
                    "repair": definition.get("repair"),
                    "best": _fitness_numbers(best), "dense": _fitness_numbers(dense),
                    "seed": None if seed is None else {"chromosome": seed_key, **_fitness_numbers(seed)}},
        "curve": [record["best"] for record in state.logbook],
        "generations": state.generation, "evaluations": state.evaluations, "seconds": seconds,
        "stopped_because": stop,
        "next": f"python -m finetune.best --chromosome {best_path}",
        "export_only": f"python -m finetune.best --chromosome {best_path} --steps 0 --out {best_path.parent / 'compact'}",
    }


def _fitness_numbers(fitness: Fitness) -> dict[str, Any]:
    return {"perplexity": fitness.perplexity, "kl": fitness.kl}


def summary_lines(summary: dict[str, Any]) -> list[str]:
    f, layers, params = summary["fitness"], summary["layers"], summary["decoder_parameters"]
    lines = [
        f"stopped: {summary['stopped_because']} after {summary['generations']} generations, "
        f"{summary['evaluations']} evaluations, {summary['seconds']:.0f} s",
        f"best chromosome {summary['best']}: {layers['compact']} of {layers['base']} decoder layers kept "
        f"(skipped {layers['skipped'] or 'none'}, merged {layers['merged'] or 'none'})",
        f"parameters: {summary['model_parameters']['dense']:,} -> {summary['model_parameters']['compact']:,} "
        f"({params['removed_share']:.1%} of the decoder layers' removed)",
        f"calibration perplexity ({f['measured_on']}, repair {f['repair'].get('method') if f['repair'] else 'none'}): "
        f"dense {f['dense']['perplexity']:.2f}, best {f['best']['perplexity']:.2f}"
        + (f", one-shot seed {f['seed']['perplexity']:.2f}" if f["seed"] else ""),
        f"next: {summary['next']}",
        f"  or export it untrained: {summary['export_only']}",
    ]
    return lines


def write_summary(summary: dict[str, Any], folder: Path) -> None:
    write_json_atomic(folder / "summary.json", summary)
    plot_summary(summary, folder / "summary.png")


def plot_summary(summary: dict[str, Any], path: Path) -> None:
    """The layer map of the best chromosome above the best-fitness curve."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    genes = [int(c) for c in summary["best"]]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), gridspec_kw={"height_ratios": [1, 3]})
    top.imshow([genes], cmap=ListedColormap(["#222222", "#dddddd", "#ff8c00"]), vmin=0, vmax=2, aspect="auto")
    top.set_yticks([])
    top.set_xticks(range(len(genes)))
    top.tick_params(labelsize=7)
    top.set_title("best chromosome: black = skip, grey = keep, orange = merge", fontsize=9)
    bottom.plot(range(len(summary["curve"])), summary["curve"], marker="o", label="best of generation")
    f = summary["fitness"]
    key = "kl" if f["objective"] == "kl" else "perplexity"
    if f["seed"] and f["seed"][key] is not None:
        bottom.axhline(f["seed"][key], color="grey", linestyle="--", label="one-shot seed")
    if f["dense"][key] is not None:
        bottom.axhline(f["dense"][key], color="green", linestyle=":", label="dense model")
    bottom.set_xlabel("generation")
    bottom.set_ylabel(f"calibration {key}")
    bottom.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.partial.png")
    figure.savefig(staged, dpi=110)
    plt.close(figure)
    staged.replace(path)
