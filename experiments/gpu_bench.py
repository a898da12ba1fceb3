"""One GPU call's worth of measurements on a Llama-3-8B-shaped model (random weights, bf16):
what a search costs at real scale.

In one run, inside one 10-minute accelerator call:
- fitness throughput, naive (the HF forward with labels, no sharing) against gaprune (shared
  prefixes), alternated A B A B with medians, on chromosomes keeping 24 of 32 layers, at 2,048
  and 32,768 tokens per evaluation: evaluations/s, tokens/s and achieved TFLOP/s against the
  GPU's bf16 peak (`--peak-tflops`); gaprune's TFLOP/s count the FLOPs a full forward would
  do, so shared prefixes show as more than the naive figure;
- a calibrated fitness in bf16 (norm SGD on fp32 masters) and a seam-repaired one (the default
  repair: its dense states, then an evaluation);
- one merge alignment of a layer pair at 14,336 MLP units: streamed statistics, and both
  assignments (greedy on the device, Hungarian on the CPU);
- peak GPU memory of each part.
The text is random words through a word-level tokenizer: the weights are random too, so only
time and memory mean anything here.

    python -m experiments.gpu_bench                 # on a GPU
    python -m experiments.gpu_bench --smoke         # a tiny shape on the CPU (the test suite runs it)

Results: experiments/results/<output>.{json,csv,md} (--out-dir elsewhere).
"""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from evaluators.alignment import greedy, hungarian, pair_statistics
from evaluators.config import EvaluatorConfig
from evaluators.families import Geometry
from evaluators.fitness import ModelEvaluator
from experiments.report import RESULTS, save_results
from experiments.throughput import naive_perplexity

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
SMOKE = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1024, max_position_embeddings=256)


def random_model(shape: dict[str, int], device: torch.device, dtype: torch.dtype):
    """A Llama of this shape with random weights, built on the device (no copy through CPU RAM)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape, tie_word_embeddings=False), dtype=dtype)
    return model.eval().requires_grad_(False)


def word_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """One token per word w0, w1, ...: the ids a random-weight model reads."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i for i in range(vocab - 1)} | {"<unk>": vocab - 1}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def random_text(path: Path, words: int, vocab: int) -> Path:
    generator = random.Random(0)
    path.write_text(" ".join(f"w{generator.randrange(vocab - 1)}" for _ in range(words)))
    return path


def chromosomes(layers: int, keep: int, count: int) -> list[list[int]]:
    generator = random.Random(1)
    population = []
    while len(population) < count:
        removed = set(generator.sample(range(1, layers - 1), layers - keep))  # first and last layers stay
        genes = [0 if i in removed else 1 for i in range(layers)]
        if genes not in population:
            population.append(genes)
    return population


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, call: Callable[[], Any]) -> tuple[float, Any]:
    synchronize(device)
    started = time.perf_counter()
    result = call()
    synchronize(device)
    return time.perf_counter() - started, result


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def forward_flops(shape: dict[str, int], kept_layers: int, tokens: int, seq_len: int) -> float:
    """FLOPs of one forward over `tokens` tokens with `kept_layers` decoder layers and the head:
    2 per parameter and token, plus causal attention (2 x seq_len x hidden per token and layer)."""
    h, m, heads, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_attention_heads"], \
        shape["num_key_value_heads"]
    layer = 2 * h * h + 2 * h * (h * kv // heads) + 3 * h * m
    return 2.0 * tokens * (kept_layers * layer + h * shape["vocab_size"]) + 2.0 * kept_layers * tokens * seq_len * h


def throughput_rows(evaluator: ModelEvaluator, shape: dict[str, int], population: list[list[int]],
                    token_counts: Sequence[int], rounds: int, peak_tflops: float) -> list[dict[str, Any]]:
    """Naive and gaprune on the same chromosomes, alternated A B A B; medians of `rounds` each."""
    device, seq_len = evaluator.model.device, evaluator.config.seq_len
    kept = sum(population[0])
    rows = []
    for tokens in token_counts:
        windows = tokens // seq_len
        runs = {"naive": lambda: [naive_perplexity(evaluator, genes, windows) for genes in population],
                "gaprune": lambda: evaluator.evaluate(population, tokens=tokens)}
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        reset_peak(device)
        for round_ in range(rounds):
            for name in (("naive", "gaprune") if round_ % 2 == 0 else ("gaprune", "naive")):
                seconds[name].append(timed(device, runs[name])[0])
        flops = forward_flops(shape, kept, tokens, seq_len)
        for name, values in seconds.items():
            per_eval = statistics.median(values) / len(population)
            rows.append({"part": f"fitness, {name}", "tokens": tokens, "evaluations": len(population),
                         "seconds per evaluation": per_eval, "evaluations/s": 1 / per_eval, "tokens/s": tokens / per_eval,
                         "TFLOP/s": flops / per_eval / 1e12, "share of peak": flops / per_eval / 1e12 / peak_tflops,
                         "peak GiB": peak_gib(device)})
        rows.append({"part": "fitness, gaprune / naive", "tokens": tokens,
                     "ratio": statistics.median(seconds["naive"]) / statistics.median(seconds["gaprune"])})
    return rows


def variant_row(part: str, base: ModelEvaluator, loaded, population: list[list[int]], tokens: int,
                **settings: Any) -> dict[str, Any]:
    """One evaluator setting on the same model: its first evaluation (statistics included) and
    the next (what a search then pays per chromosome)."""
    device = base.model.device
    evaluator = ModelEvaluator(EvaluatorConfig(**{**base.config.to_dict(), **settings}), loaded)
    reset_peak(device)
    first, scored = timed(device, lambda: evaluator.evaluate(population[:1], tokens=tokens))
    then, _ = timed(device, lambda: evaluator.evaluate(population[1:2], tokens=tokens))
    return {"part": part, "tokens": tokens, "first evaluation s": first, "seconds per evaluation": then,
            "perplexity": scored[0].perplexity, "peak GiB": peak_gib(device)}


def alignment_rows(evaluator: ModelEvaluator, anchor: int, other: int) -> list[dict[str, Any]]:
    """One merge alignment at the model's MLP width: streamed statistics, then each assignment."""
    device = evaluator.model.device
    geometry = Geometry.of(evaluator.model.config)
    blocks = evaluator.builder.align_blocks
    reset_peak(device)
    seconds, (moments, _) = timed(device, lambda: pair_statistics(
        evaluator.model, evaluator.builder.dense_layers, evaluator.family, geometry, blocks, evaluator.batch_size, anchor, other))
    similarity = moments.correlation()
    units = similarity.shape[0]
    rows = [{"part": "alignment statistics", "tokens": blocks.numel(), "units": units, "seconds": seconds,
             "peak GiB": peak_gib(device)}]
    totals = {}
    for name, method in (("greedy (device)", greedy), ("hungarian (CPU)", hungarian)):
        reset_peak(device)
        seconds, order = timed(device, lambda: method(similarity))
        totals[name] = float(similarity[torch.arange(units, device=similarity.device), order.to(similarity.device)].sum())
        rows.append({"part": f"alignment, {name}", "units": units, "seconds": seconds, "peak GiB": peak_gib(device),
                     "mean correlation": totals[name] / units})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.gpu_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU, in seconds")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100/H200 SXM: 989)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds of each evaluator")
    parser.add_argument("--population", type=int, default=8, help="chromosomes per round")
    parser.add_argument("--output", default=None, help="results stem (default gpu_bench, or gpu_bench-smoke)")
    parser.add_argument("--out-dir", default=str(RESULTS))
    args = parser.parse_args(argv)

    shape = SMOKE if args.smoke else LLAMA3_8B
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    seq_len, token_counts = (64, (128, 512)) if args.smoke else (2048, (2048, 32768))
    layers, keep = shape["num_hidden_layers"], shape["num_hidden_layers"] * 3 // 4
    started = time.perf_counter()
    model = random_model(shape, device, dtype)
    loaded = (model, word_tokenizer(shape["vocab_size"]))
    with tempfile.TemporaryDirectory() as work:
        text = random_text(Path(work) / "words.txt", 2 * max(token_counts) + 2 * 32768, shape["vocab_size"])
        config = EvaluatorConfig(model="random " + ("smoke" if args.smoke else "llama-3-8b shape"), data=str(text),
                                 seq_len=seq_len, score_tokens=max(token_counts), batch_size=4, repair="none",
                                 device=str(device), dtype=str(dtype).removeprefix("torch."))
        evaluator = ModelEvaluator(config, loaded)
        population = chromosomes(layers, keep, args.population)
        rows = throughput_rows(evaluator, shape, population, token_counts, args.rounds, args.peak_tflops)
        rows.append(variant_row("fitness, calibrated (2 norm steps)", evaluator, loaded, population, token_counts[0],
                                calib_steps=2))
        repair_tokens = 1024 if args.smoke else EvaluatorConfig.repair_tokens
        rows.append(variant_row(f"fitness, seam-repaired (lsq, {repair_tokens} tokens)", evaluator, loaded, population,
                                token_counts[0], repair="lsq", repair_tokens=repair_tokens))
        rows += alignment_rows(evaluator, layers // 2, layers // 2 + 1)
    for row in rows:
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    columns = ["part", "tokens", "units", "seconds per evaluation", "evaluations/s", "tokens/s", "TFLOP/s",
               "share of peak", "ratio", "first evaluation s", "seconds", "mean correlation", "peak GiB"]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    save_results(args.output or ("gpu_bench-smoke" if args.smoke else "gpu_bench"),
                 {"device": device_name, "dtype": str(dtype), "shape": shape, "kept_layers": keep, "seq_len": seq_len,
                  "peak_tflops": args.peak_tflops, "rounds": args.rounds, "population": args.population,
                  "torch": torch.__version__, "seconds": time.perf_counter() - started, "rows": rows},
                 rows, columns, Path(args.out_dir))


if __name__ == "__main__":
    main()
