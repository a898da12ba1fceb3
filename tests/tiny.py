"""Tiny models of every supported family, built from configs (no hub access), and a tokenizer.

The text is generated from a small grammar, so that a tiny model can learn something from it
and the tests of training and healing can see the loss fall.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GraniteConfig, GraniteForCausalLM,
    LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM,
    Olmo2Config, Olmo2ForCausalLM, Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
    Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM,
)

COMMON = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
              head_dim=8, max_position_embeddings=256, rms_norm_eps=1e-6)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 16}),
    # Qwen2 with sliding-window attention on its upper layers: layer_types is mixed.
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 3}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {}),
    # Norms that scale by 1 + w and sit around each sub-layer (four per layer), sliding and
    # global layers, eager attention only (Gemma 2): merging folds 1 + w; seam maps are fitted
    # by gradient (a norm follows each sub-layer).
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, {"sliding_window": 16}),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, {"sliding_window": 16}),
    # Mixtures of experts (experts as stacked 3-d weights): skip/keep only; seam maps fold into
    # every expert's down projection.
    "mixtral": (MixtralConfig, MixtralForCausalLM, {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM, {"num_experts": 4, "num_experts_per_tok": 2,
                                                        "moe_intermediate_size": 32, "decoder_sparse_step": 1}),
    # Fused qkv_proj and gate_up_proj: merging splits and joins them, seam repair works.
    "phi3": (Phi3Config, Phi3ForCausalLM, {}),
    # Norms after attention and MLP (no input norm) and q/k norms over all heads: merging
    # permutes the q/k norms with their heads; seam maps are fitted by gradient.
    "olmo2": (Olmo2Config, Olmo2ForCausalLM, {}),
    # Llama's layout with multipliers: each sub-layer's output is scaled before it joins the
    # residual stream, a linear factor the seam repair fits through.
    "granite": (GraniteConfig, GraniteForCausalLM, {"residual_multiplier": 0.5, "embedding_multiplier": 2.0,
                                                    "logits_scaling": 2.0, "attention_multiplier": 0.2}),
}
MERGEABLE = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2", "granite")
REPAIRABLE = ("llama", "mistral", "qwen2", "qwen3", "phi3", "granite", "gemma2", "gemma3", "olmo2", "mixtral", "qwen3_moe")
WIDTHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2", "granite")  # not experts

NOUNS = "cat dog bird fish lion horse mouse wolf bear fox owl frog".split()
VERBS = "sees chases likes finds follows hears meets helps".split()
ADJECTIVES = "big small red old young quick lazy happy".split()


def grammar_text(sentences: int, seed: int) -> str:
    """Sentences of a toy grammar: 'the big cat sees a dog .' in paragraphs."""
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        subject = f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
        obj = f"a {rng.choice(NOUNS)}"
        lines.append(f"{subject} {rng.choice(VERBS)} {obj} .")
    return "\n".join(" ".join(lines[i:i + 6]) for i in range(0, len(lines), 6))


def write_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([grammar_text(400, seed=0)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>")
    fast.save_pretrained(folder)
    return fast


def cut_layers(model, genes):
    """The model cut to a depth chromosome for good, unrepaired (what the search scores with --repair none)."""
    from evaluators.build import Builder
    from evaluators.config import EvaluatorConfig

    return Builder(model, None, EvaluatorConfig(repair="none"), 4).compact(genes)


def build_model(family: str, folder: Path, num_layers: int = 6, seed: int = 0, vocab_size: int = 320):
    """Save a randomly initialised tiny model of the family (and the shared tokenizer) to folder."""
    config_class, model_class, extra = FAMILIES[family]
    config = config_class(vocab_size=vocab_size, num_hidden_layers=num_layers, bos_token_id=1, eos_token_id=2,
                          pad_token_id=2, tie_word_embeddings=False, **COMMON, **extra)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():  # wider weights than the default init, so that layers differ clearly
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.15)
            elif "norm" in name:
                parameter.uniform_(0.7, 1.3)
    model.save_pretrained(folder)
    write_tokenizer(folder)
    return model
