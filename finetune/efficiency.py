"""What a smaller model buys: size, memory and speed of the compact model against the dense one,
measured in the same process on the same device, alternating the two (A B A B) and reporting
medians, so that a busy machine slows both alike.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import PreTrainedModel

PREFILL_TOKENS = 512
DECODE_PROMPT = 32
DECODE_TOKENS = 32
REPEATS = 3


def weight_bytes(model: PreTrainedModel) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def folder_bytes(folder: Path) -> int:
    """Bytes of the weight files in a saved model folder."""
    return sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))


@torch.no_grad()
def prefill(model: PreTrainedModel, ids: torch.Tensor) -> None:
    """One forward over the prompt, as a server's prefill (no KV cache kept)."""
    model(input_ids=ids, use_cache=False)


@torch.no_grad()
def decode(model: PreTrainedModel, ids: torch.Tensor) -> None:
    """DECODE_TOKENS greedy tokens after a DECODE_PROMPT-token prompt, with the KV cache."""
    model.generate(ids[:, :DECODE_PROMPT], max_new_tokens=DECODE_TOKENS, min_new_tokens=DECODE_TOKENS,
                   do_sample=False, pad_token_id=model.config.eos_token_id)


def timed(run: Callable[[PreTrainedModel, torch.Tensor], None], model: PreTrainedModel, ids: torch.Tensor) -> tuple[float, int | None]:
    """Seconds of one call, and the peak GPU memory it reached (None on a CPU)."""
    device = ids.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    run(model, ids)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return seconds, peak


def compare(dense: PreTrainedModel, compact: PreTrainedModel, ids: torch.Tensor) -> dict[str, Any]:
    """Prefill and decode throughput of both models, alternated, medians of REPEATS rounds.

    `ids` [1, >= PREFILL_TOKENS] are real text tokens; the prefill reads PREFILL_TOKENS of them, the
    decode greedily generates DECODE_TOKENS after a DECODE_PROMPT-token prompt, with the KV cache.
    """
    ids = ids[:, :PREFILL_TOKENS].to(next(compact.parameters()).device)
    models = {"dense": dense, "compact": compact}
    for model in models.values():  # warm-up: first calls allocate and pick kernels
        prefill(model, ids[:, :DECODE_PROMPT])
    times: dict[str, dict[str, list[float]]] = {name: {"prefill": [], "decode": []} for name in models}
    peaks: dict[str, int | None] = {name: None for name in models}
    for _ in range(REPEATS):
        for name, model in models.items():
            for phase, run in (("prefill", prefill), ("decode", decode)):
                seconds, peak = timed(run, model, ids)
                times[name][phase].append(seconds)
                if peak is not None:
                    peaks[name] = max(peaks[name] or 0, peak)
    result: dict[str, Any] = {}
    for name, model in models.items():
        result[name] = {
            "layers": model.config.num_hidden_layers,
            "parameters": sum(p.numel() for p in model.parameters()),
            "weight_bytes": weight_bytes(model),
            "peak_memory_bytes": peaks[name],
            "prefill_tokens_per_s": ids.shape[1] / statistics.median(times[name]["prefill"]),
            "decode_tokens_per_s": DECODE_TOKENS / statistics.median(times[name]["decode"]),
        }
    result["ratios"] = {key: result["compact"][key] / result["dense"][key]
                        for key in ("parameters", "weight_bytes", "prefill_tokens_per_s", "decode_tokens_per_s")}
    result["protocol"] = {"prefill_tokens": int(ids.shape[1]), "decode_prompt": DECODE_PROMPT,
                          "decode_tokens": DECODE_TOKENS, "repeats": REPEATS, "order": "dense, compact alternated",
                          "device": str(ids.device), "threads": torch.get_num_threads()}
    return result


def efficiency_lines(report: dict[str, Any]) -> list[str]:
    d, c, r = report["dense"], report["compact"], report["ratios"]
    lines = [f"  parameters      {d['parameters']:>14,} -> {c['parameters']:>14,}  ({r['parameters']:.2f}x)",
             f"  weights (bytes) {d['weight_bytes']:>14,} -> {c['weight_bytes']:>14,}  ({r['weight_bytes']:.2f}x)"]
    if "file_bytes" in d:
        lines.append(f"  files (bytes)   {d['file_bytes']:>14,} -> {c['file_bytes']:>14,}")
    if d["peak_memory_bytes"] is not None:
        lines.append(f"  peak GPU memory {d['peak_memory_bytes']:>14,} -> {c['peak_memory_bytes']:>14,}")
    lines += [f"  prefill tok/s   {d['prefill_tokens_per_s']:>14.1f} -> {c['prefill_tokens_per_s']:>14.1f}  "
              f"({r['prefill_tokens_per_s']:.2f}x)",
              f"  decode tok/s    {d['decode_tokens_per_s']:>14.1f} -> {c['decode_tokens_per_s']:>14.1f}  "
              f"({r['decode_tokens_per_s']:.2f}x)"]
    return lines
