"""What saving a generation costs as a run grows: the checkpoint with append-only logs against
the whole state rewritten each time (checkpoint version 1), up to --gens generations.

The search is ga.run's real loop (`evolve`, its defaults: population 16, 4 offspring screened
from 16 candidates) on a synthetic fitness that costs nothing, so that only bookkeeping is
timed. After every generation both layouts are written, in alternating order (A B, B A):
- version 2 (what gaprune writes): the new log lines appended, then checkpoint.json;
- version 1: one JSON file with the whole state, logs inline, written atomically.
Also timed at the end: the TensorBoard layer maps drawn from the whole history and from the
window the board now draws (`MAP_GENERATIONS`).

    python -m experiments.checkpoint_growth --gens 500

Results: experiments/results/checkpoint_growth.{json,csv,md}.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from chromosomes import blocks
from evaluators.fitness import Fitness
from experiments.report import save_results
from ga.board import MAP_GENERATIONS, best_map, frequency_map
from ga.checkpoint import CHECKPOINT_FORMAT, RunFolder
from ga.config import SearchConfig
from ga.engine import evolve
from gaprune.files import write_json_atomic

LAYERS = 30
REMOVED = 8
MARKS = (1, 10, 50, 100, 250, 500, 1000)


class SyntheticEvaluator:
    """A free, deterministic fitness with structure (each removed layer has its own cost, runs
    of removed layers cost less), so that the search keeps finding new chromosomes."""

    num_layers = LAYERS

    def evaluate(self, population: Sequence[Sequence[int]], tokens: int | None = None) -> list[Fitness]:
        out = []
        for genes in population:
            runs = len(blocks(genes))
            cost = sum((i * 7919) % 13 for i, g in enumerate(genes) if g != 1) + runs + (tokens or 0) % 3
            out.append(Fitness(float(20 + cost), float(cost), 4092))
        return out

    def describe(self) -> dict[str, Any]:
        return {"model": "synthetic", "num_layers": LAYERS, "data": "none", "seq_len": 1024, "tokens": 4092}

    def block_influence(self) -> list[float]:
        return [float(i) for i in range(LAYERS)]


class TimedFolder(RunFolder):
    """The run folder, timing each save of both layouts after every generation."""

    def __init__(self, path: Path, whole: Path):
        super().__init__(path)
        self.whole = whole
        self.rows: list[dict[str, Any]] = []

    def save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        generation = checkpoint["state"]["generation"]
        logs_before = self._log_bytes()
        order = ("logs", "whole") if generation % 2 == 0 else ("whole", "logs")
        seconds = {}
        for layout in order:
            started = time.perf_counter()
            if layout == "logs":
                super().save_checkpoint(checkpoint)
            else:
                write_json_atomic(self.whole, {"format": CHECKPOINT_FORMAT, "version": 1, **checkpoint})
            seconds[layout] = time.perf_counter() - started
        self.rows.append({"generation": generation, "evaluations": len(checkpoint["state"]["cache"]),
                          "screenings": len(checkpoint["state"]["screen_cache"]),
                          "v1 bytes": self.whole.stat().st_size, "v1 ms": 1000 * seconds["whole"],
                          "v2 checkpoint bytes": self.checkpoint_path.stat().st_size,
                          "v2 appended bytes": self._log_bytes() - logs_before, "v2 ms": 1000 * seconds["logs"]})

    def _log_bytes(self) -> int:
        return sum(self.log_path(log).stat().st_size for log in ("generations", "evaluations")
                   if self.log_path(log).is_file())


def map_seconds(history: list[dict[str, Any]], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        best_map(history), frequency_map(history)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.checkpoint_growth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gens", type=int, default=500, help="generations of the synthetic run")
    parser.add_argument("--window", type=int, default=10, help="generations around each mark whose timings are "
                                                               "summarised (median)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        folder = TimedFolder(Path(work) / "run", Path(work) / "whole.json")
        search = SearchConfig(gens=args.gens, remove=REMOVED, init="random", patience=0, seed=0)
        state = evolve(SyntheticEvaluator(), search, folder, progress=False)
        reloaded = RunFolder(folder.path).load_checkpoint()
    assert reloaded["state"]["history"] == state.history, "the logs do not read back as the run's history"
    rows = []
    for mark in (m for m in MARKS if m <= args.gens):
        near = [r for r in folder.rows if mark - args.window < r["generation"] <= mark] or [folder.rows[mark]]
        last = near[-1]
        rows.append({**{k: last[k] for k in ("generation", "evaluations", "screenings", "v1 bytes",
                                             "v2 checkpoint bytes", "v2 appended bytes")},
                     "v1 ms": statistics.median(r["v1 ms"] for r in near),
                     "v2 ms": statistics.median(r["v2 ms"] for r in near)})
    for row in rows:
        row["v1 / v2 time"] = row["v1 ms"] / row["v2 ms"]
    maps = {"generations": len(state.history), "whole history s": map_seconds(state.history),
            f"last {MAP_GENERATIONS} s": map_seconds(state.history[-MAP_GENERATIONS:])}
    columns = ["generation", "evaluations", "screenings", "v1 bytes", "v1 ms", "v2 checkpoint bytes",
               "v2 appended bytes", "v2 ms", "v1 / v2 time"]
    save_results("checkpoint_growth", {"gens": args.gens, "window": args.window, "search": search.to_dict(),
                                       "rows": rows, "layer_maps": maps, "every_generation": folder.rows},
                 rows, columns)
    for row in rows:
        print(" ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    print(f"layer maps at {maps['generations']} generations: whole history {maps['whole history s'] * 1000:.1f} ms, "
          f"last {MAP_GENERATIONS} {maps[f'last {MAP_GENERATIONS} s'] * 1000:.1f} ms")


if __name__ == "__main__":
    main()
