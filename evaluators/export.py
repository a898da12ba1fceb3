"""Saving a compact model where the ecosystem can read it, and loading it back.

A model whose layers are alike (depth cuts, merges, one width everywhere) is a plain Hugging
Face folder: its config says the widths, and `from_pretrained` loads it. A model whose layers
differ says so in transformers' own `per_layer_config` (config.json): per layer, the
`intermediate_size`, `num_key_value_heads` and `num_attention_heads` that differ from the global
ones, and `skip: ["attention"]` or `["mlp"]` for a removed sub-layer, whose weights and norms are
then absent from model.safetensors (the other weights keep their standard names, at their
narrowed shapes). transformers validates such a config but its Llama-family modeling does not
build layers from it yet, so `load_pruned` does: the model is built at the global widths on the
meta device, each layer cut to its own, and the saved tensors put in (safetensors: no pickle,
no remote code).
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from chromosomes.width import LayerUnits
from evaluators.families import Geometry, family_of
from evaluators.models import decoder_layers
from evaluators.units import EmptyMLP, NoAttention, full_geometry, narrowed, sublayer_paths

# The file an earlier gaprune wrote beside the config of a model whose layers differed in width.
OLD_WIDTHS_FILE = "gaprune_widths.json"
WIDTH_KEYS = ("num_key_value_heads", "num_attention_heads", "intermediate_size")


def layer_widths(model: PreTrainedModel) -> list[dict[str, Any]]:
    """Per decoder layer, its widths as config attributes, and the sub-layers it lacks (`skip`)."""
    family = family_of(model)
    geometry, _ = full_geometry(model)
    paths = sublayer_paths(family)
    widths = []
    for layer in decoder_layers(model):
        attention, mlp = family.module(layer, paths["attention"][0]), family.module(layer, paths["mlp"][0])
        entry: dict[str, Any] = {"skip": []}
        if isinstance(attention, NoAttention):
            entry["skip"].append("attention")
        else:
            kv_heads = geometry_of_layer(layer, family, geometry).kv_heads
            entry.update(num_key_value_heads=kv_heads, num_attention_heads=kv_heads * geometry.group_size)
        if isinstance(mlp, EmptyMLP):
            entry["skip"].append("mlp")
        else:
            entry["intermediate_size"] = family.module(layer, family.down).in_features
        widths.append(entry)
    return widths


def geometry_of_layer(layer: nn.Module, family, geometry: Geometry) -> Geometry:
    """The head layout of a (possibly cut) layer: its k projection's rows count its key-value heads."""
    if family.qkv:  # a fused matrix: q, k, v rows in the ratio of the full layout
        rows = family.module(layer, family.qkv).out_features
        kv_heads = rows // ((geometry.group_size + 2) * geometry.head_dim)
    else:
        kv_heads = family.module(layer, family.k).out_features // geometry.head_dim
    return Geometry(kv_heads * geometry.group_size, kv_heads, geometry.head_dim)


def save_compact(model: PreTrainedModel, folder: str | Path) -> str:
    """Save the model and say what loads it: "transformers" (a plain folder) or "gaprune"
    (`load_pruned`: layers that differ, described by `per_layer_config`)."""
    folder = Path(folder)
    if family_of(model).experts:  # never cut in width: layers of one shape
        model.save_pretrained(folder)
        return "transformers"
    widths = layer_widths(model)
    uniform = {json.dumps(entry, sort_keys=True) for entry in widths}
    if len(uniform) == 1 and not widths[0]["skip"]:
        config = model.config
        for key in WIDTH_KEYS:
            setattr(config, key, widths[0][key])
        model.save_pretrained(folder)
        return "transformers"
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    heterogeneous_config(model, widths).save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"))
    return "gaprune"


def write_model_folder(model: PreTrainedModel, tokenizer: Any, folder: str | Path,
                       files: dict[str, str] | None = None) -> str:
    """A complete model folder (the model as `save_compact` saves it, its tokenizer and `files` by
    name), built beside `folder` and renamed into place, so that a crash never leaves half of one;
    refuses a folder that exists. Returns what loads it."""
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} already exists")
    staging = folder.parent / f".{folder.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    loads_with = save_compact(model, staging)
    tokenizer.save_pretrained(staging)
    for name, text in (files or {}).items():
        (staging / name).write_text(text)
    staging.rename(folder)
    return loads_with


def heterogeneous_config(model: PreTrainedModel, widths: list[dict[str, Any]]):
    """A copy of the model's config with its layers' own widths as transformers' per_layer_config."""
    config = copy.deepcopy(model.config)
    overrides = {}
    for index, entry in enumerate(widths):
        differ = {key: entry[key] for key in WIDTH_KEYS if key in entry and entry[key] != getattr(config, key)}
        if entry["skip"]:
            differ["skip"] = entry["skip"]
        if differ:
            overrides[index] = differ
    config.allow_global_per_layer_attribute_access = True  # Llama validates head counts globally
    config.per_layer_config = overrides
    return config


def load_pruned(folder: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None
                ) -> PreTrainedModel:
    """Load a model saved by gaprune: a plain folder through transformers; one whose layers
    differ is built at the global widths without memory, cut layer by layer, then filled."""
    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    if (folder / OLD_WIDTHS_FILE).is_file():
        widths = [{"num_key_value_heads": w["kv_heads"], "intermediate_size": w["channels"], "skip": []}
                  for w in json.loads((folder / OLD_WIDTHS_FILE).read_text())["layers"]]
    elif getattr(config, "is_heterogeneous", False):
        config.allow_global_per_layer_attribute_access = True
        widths = [_layer_config_widths(config.per_layer_config[i]) for i in range(config.num_hidden_layers)]
    else:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device).eval()
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    base = copy.deepcopy(config)
    base.per_layer_config = None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(base, dtype=dtype)
    family = family_of(model)
    geometry, channels = full_geometry(model)
    layers = decoder_layers(model)
    for index, entry in enumerate(widths):
        keep = LayerUnits(() if "attention" in entry["skip"] else tuple(range(entry["num_key_value_heads"])),
                          () if "mlp" in entry["skip"] else tuple(range(entry["intermediate_size"])))
        layers[index] = narrowed(layers[index], keep, family, geometry, channels)
    state = load_file(str(folder / "model.safetensors"), device=str(device or "cpu"))
    if config.tie_word_embeddings:  # safetensors keeps one name of a shared tensor: either may be the one
        embedding = next(name for name, p in model.named_parameters() if p is model.get_input_embeddings().weight)
        head = next((name for name in state if name.endswith("lm_head.weight")), None)
        if embedding not in state and head is not None:
            state[embedding] = state.pop(head)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {name for name in missing if name.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{folder}: model.safetensors does not fit its config (missing {sorted(set(missing) - tied)}, "
                         f"unexpected {sorted(unexpected)})")
    model.tie_weights()
    if getattr(config, "is_heterogeneous", False):
        model.config = config
    if device is not None:
        model.to(device)
    return model.eval()


def _layer_config_widths(layer_config) -> dict[str, Any]:
    return {"num_key_value_heads": layer_config.num_key_value_heads, "intermediate_size": layer_config.intermediate_size,
            "skip": list(getattr(layer_config, "skip", []) or [])}
