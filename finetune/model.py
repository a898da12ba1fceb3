"""What heals a compact model (`evaluators.compact` cuts it): a peft adapter, or (plan tail) the
model's own last layers and head. Everything that can be checked without weights (window
lengths, the plan's targets) is checked first, so that a bad input fails in a second.
"""
from __future__ import annotations

import warnings

import torch
from peft import LNTuningConfig, LoraConfig, PeftConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from evaluators.compact import base_model_config
from evaluators.families import family_of
from evaluators.models import decoder_layers, skeleton
from finetune.config import HealConfig


def check_windows(config: HealConfig, spec: str) -> None:
    """Refuse windows longer than the model's context: the positions beyond it were never trained."""
    context = base_model_config(spec).get("max_position_embeddings")
    used = ("seq_len",) * bool(config.steps) + ("eval_seq_len",) * bool(config.measure)
    for name in used:
        if context is not None and getattr(config, name) > context:
            raise ValueError(f"{name} ({getattr(config, name)}) exceeds the context of {spec} ({context} tokens)")


def check_plan_targets(config: HealConfig, spec: str) -> None:
    """Refuse a LoRA plan whose projections the model does not have, before any weights load:
    the model is built on the meta device to read its layer family and module names."""
    if not config.lora_roles:
        return
    model = skeleton(spec)
    targets = lora_targets(model, config)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [target for target in targets if target not in names]
    if missing:
        raise ValueError(f"plan {config.plan} puts LoRA on {', '.join(targets)}, but "
                         f"{type(model).__name__} has no {', '.join(missing)} (a mixture of experts?); "
                         "use --plan norm or --plan tail")


def lora_targets(model: PreTrainedModel, config: HealConfig) -> tuple[str, ...]:
    """The module names (as peft matches them) that hold the plan's projections in this model."""
    return family_of(model).lora_targets(config.lora_roles)


def norm_module_names(model: PreTrainedModel, include_qk: bool) -> list[str]:
    """Names (matched by peft as suffixes) of the norms to train: each layer's own norms as its
    family names them, q_norm/k_norm only when asked, and the final norm by its full path
    (its short name `norm` is a suffix of every other norm's)."""
    family = family_of(model)
    names = [*family.layer_norms, *(family.head_norms if include_qk else ())]
    final = next(name for name, module in model.named_modules() if module is model.model.norm)
    return sorted(names) + [final]


def adapter_config(config: HealConfig, norms: list[str], targets: tuple[str, ...]) -> PeftConfig:
    """LoRA on the plan's projections with the norms trained in full, or the norms alone.

    peft's LoRA needs at least one target layer, so the norm-only plan is peft's LayerNorm
    tuning (LN tuning) on the same norms: both save a standard adapter folder.
    """
    if targets:
        return LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                          target_modules=list(targets), modules_to_save=norms, task_type="CAUSAL_LM")
    return LNTuningConfig(target_modules=norms, task_type="CAUSAL_LM")


def attach_adapter(model: PreTrainedModel, config: HealConfig) -> PeftModel | PreTrainedModel:
    """Wrap the compact model in its adapter (plan tail: mark its own tail trainable); trained
    weights are fp32 whatever the compute dtype.

    The seed fixes the LoRA initialisation, so a resumed run rebuilds the same starting point.
    """
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if config.plan == "tail":
        return train_tail(model, config)
    torch.manual_seed(config.seed)
    with warnings.catch_warnings():
        # LN tuning warns about every norm it wraps because a norm has no in/out features.
        warnings.filterwarnings("ignore", message="Unsupported layer type .*RMSNorm")
        # peft still asks transformers for the old name of the checkpointing flag
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        peft_model = get_peft_model(model, adapter_config(config, norm_module_names(model, config.train_qk_norm),
                                                          lora_targets(model, config)))
    for parameter in trainable_parameters(peft_model).values():
        parameter.data = parameter.data.float()  # bf16 cannot hold the small updates of a norm weight near 1
    return peft_model


def train_tail(model: PreTrainedModel, config: HealConfig) -> PreTrainedModel:
    """lm_head, the last `tail_layers` decoder layers and every RMSNorm trained in full, in place.

    No adapter: full training of a few layers is what "Reassessing layer pruning" (Lu et al.)
    found to heal depth-pruned models best. A head that shares its weight with the input
    embeddings stays shared, so the export keeps the tied layout and its size.
    """
    layers = decoder_layers(model)
    model.requires_grad_(False)
    trained = [model.get_output_embeddings(), *layers[max(0, len(layers) - config.tail_layers):]]
    norms = tuple(norm_module_names(model, config.train_qk_norm))
    trained += [module for name, module in model.named_modules() if name.endswith(norms)]
    for module in trained:
        module.requires_grad_(True)
    for parameter in trainable_parameters(model).values():
        parameter.data = parameter.data.float()  # fp32 master weights (bf16 cannot hold small updates)
    return model


def causal_lm(model: PeftModel | PreTrainedModel) -> PreTrainedModel:
    """The causal LM being trained: inside its adapter, or itself."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def trainable_parameters(model: PeftModel | PreTrainedModel) -> dict[str, torch.nn.Parameter]:
    """The trained parameters by name, in a fixed order (the optimizer and checkpoint rely on it)."""
    return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}
