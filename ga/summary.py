"""What a finished search gives the user: the genome in words and numbers, its architecture, a
picture of it, and the command that turns it into a model. Written as summary.json and
summary.png in the run folder and printed at the end of `ga.run`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from chromosomes import Gene, LayerGene, Shape, blocks, from_string, to_string
from evaluators.fitness import Fitness
from gaprune.files import write_json_atomic

LAYERS_PER_LINE = 6  # of the architecture lines


def decoder_parameters(genes: Sequence[LayerGene], definition: dict[str, Any]) -> int:
    """Decoder-layer parameters the compact model keeps (a merge block has one layer's worth)."""
    layer_parameters = definition["layer_parameters"]
    shape = Shape.from_dict(definition["widths"]["shape"]) if definition.get("widths") else None
    return sum(layer_parameters[block.anchor] if block.whole else shape.layer_parameters(genes[block.anchor])
               for block in blocks(genes))


def architecture(genes: Sequence[LayerGene], definition: dict[str, Any]) -> list[dict[str, Any]]:
    """Per decoder layer of the base model: what became of it, and the key-value heads and MLP
    channels it keeps."""
    shape = Shape.from_dict(definition["widths"]["shape"]) if definition.get("widths") else None
    layers = []
    for index, gene in enumerate(genes):
        entry: dict[str, Any] = {"layer": index, "gene": to_string([gene])}
        if gene == Gene.MERGE:
            entry["merged_into"] = max(block.anchor for block in blocks(genes) if block.anchor < index)
        elif shape is not None and gene != Gene.SKIP:
            entry["kv_heads"], entry["channels"] = shape.counts(gene)
            entry["share"] = shape.share(gene)  # of the whole layer's parameters
        layers.append(entry)
    return layers


def build_summary(state: Any, definition: dict[str, Any], dense: Fitness, stop: str, seconds: float,
                  best_path: Path, compact: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the user reads at the end of a search, as plain data."""
    genes, best = state.best()
    kept = decoder_parameters(genes, definition)
    total = sum(definition["layer_parameters"])
    seeds = [{"chromosome": key, **_fitness_numbers(state.cache[key])} for key in state.seeds if key in state.cache]
    return {
        "best": to_string(genes),
        "layers": {"base": len(genes), "compact": len(blocks(genes)),
                   "skipped": [i for i, g in enumerate(genes) if g == Gene.SKIP],
                   "merged": [i for i, g in enumerate(genes) if g == Gene.MERGE],
                   "narrowed": [i for i, g in enumerate(genes) if isinstance(g, tuple)]},
        "architecture": architecture(genes, definition),
        "decoder_parameters": {"dense": total, "compact": kept, "removed_share": 1 - kept / total},
        "model_parameters": {"dense": definition["total_parameters"],
                             "compact": definition["total_parameters"] - (total - kept)},
        "fitness": {"objective": best.objective, "measured_on": f"{best.tokens} tokens of {definition['data']}",
                    "repair": definition.get("repair"),
                    "best": _fitness_numbers(best), "dense": _fitness_numbers(dense),
                    "seed": min(seeds, key=lambda seed: seed[_key(best.objective)], default=None)},
        "curve": [record["best"] for record in state.logbook],
        "generations": state.generation, "evaluations": state.evaluations, "seconds": seconds,
        "stopped_because": stop,
        "next": f"gaprune heal --chromosome {best_path}",
        "export_only": f"gaprune export --chromosome {best_path} --out {best_path.parent / 'export'}",
        "compact": compact,  # the folder the search wrote its pick to, and the seconds it took
    }


def _key(objective: str) -> str:
    return "kl" if objective == "kl" else "perplexity"


def _fitness_numbers(fitness: Fitness) -> dict[str, Any]:
    return {"perplexity": fitness.perplexity, "kl": fitness.kl}


def architecture_lines(layers: Sequence[dict[str, Any]]) -> list[str]:
    """The pick layer by layer: heads/channels kept, 'skip', or 'merged into N'."""
    cells = []
    for entry in layers:
        if "merged_into" in entry:
            cell = f"merged into {entry['merged_into']}"
        elif "kv_heads" in entry:
            cell = f"{entry['kv_heads']} / {entry['channels']}"
        else:
            cell = "skip" if entry["gene"] == "0" else "keep"
        cells.append(f"{entry['layer']:>3}: {cell:<15}")
    return ["  " + "".join(cells[i:i + LAYERS_PER_LINE]).rstrip() for i in range(0, len(cells), LAYERS_PER_LINE)]


def summary_lines(summary: dict[str, Any]) -> list[str]:
    f, layers, params = summary["fitness"], summary["layers"], summary["decoder_parameters"]
    lines = [
        f"stopped: {summary['stopped_because']} after {summary['generations']} generations, "
        f"{summary['evaluations']} evaluations, {summary['seconds']:.0f} s",
        f"best genome {summary['best']}: {layers['compact']} of {layers['base']} decoder layers kept "
        f"(skipped {layers['skipped'] or 'none'}, merged {layers['merged'] or 'none'}, "
        f"narrowed {len(layers['narrowed'])})",
        "architecture (key-value heads / MLP channels kept per layer):",
        *architecture_lines(summary["architecture"]),
        f"parameters: {summary['model_parameters']['dense']:,} -> {summary['model_parameters']['compact']:,} "
        f"(decoder {params['dense']:,} -> {params['compact']:,}: {params['removed_share']:.2%} removed)",
        f"calibration perplexity ({f['measured_on']}, repair {f['repair'].get('method') if f['repair'] else 'none'}): "
        f"dense {f['dense']['perplexity']:.2f}, best {f['best']['perplexity']:.2f}"
        + (f", one-shot seed {f['seed']['perplexity']:.2f}" if f["seed"] else ""),
        *([f"compact model, repaired, untrained: {summary['compact']['folder']} (evaluators.export.load_pruned loads it)"]
          if summary["compact"] else []),
        f"next: {summary['next']}",
        f"  or export it again: {summary['export_only']}",
    ]
    return lines


def write_summary(summary: dict[str, Any], folder: Path) -> None:
    write_json_atomic(folder / "summary.json", summary)
    plot_summary(summary, folder / "summary.png")


def plot_summary(summary: dict[str, Any], path: Path) -> None:
    """The share of each layer's parameters the best genome keeps above the best-fitness curve."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    genes = from_string(summary["best"])
    kept = [entry.get("share", float(gene == Gene.KEEP)) for gene, entry in zip(genes, summary["architecture"])]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), gridspec_kw={"height_ratios": [1, 3]})
    colours = ["#ff8c00" if gene == Gene.MERGE else "#444444" for gene in genes]
    top.bar(range(len(genes)), kept, color=colours)
    top.set_ylim(0, 1)
    top.set_xticks(range(len(genes)))
    top.tick_params(labelsize=7)
    top.set_title("best genome: share of each layer's parameters kept (orange: merged into the layer before)", fontsize=9)
    bottom.plot(range(len(summary["curve"])), summary["curve"], marker="o", label="best of generation")
    f = summary["fitness"]
    key = _key(f["objective"])
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

