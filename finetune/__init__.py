"""Healing a pruned model: LoRA and RMSNorm training of the compact model (`python -m finetune.best`)."""
