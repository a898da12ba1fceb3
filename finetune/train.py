"""The healing loop: AdamW on the adapter and norm weights, on the calibration text.

One loop in comment-headed phases (optimizer, resume, then per step: forward/backward,
update, log, evaluate, checkpoint), with its helpers just above it. The loss is the next-token
NLL the perplexity protocol measures (so training and evaluation agree on what a token costs),
or distillation from the dense model: the KL divergence of the student's next-token
distribution from the teacher's, computed from the teacher's final hidden states. Either is
summed over chunks of tokens whose logits are recomputed in the backward pass, so that tokens x
vocabulary logits are never held whole.
"""
from __future__ import annotations

import contextlib
import math
import re
import time
from functools import partial
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel
from torch.utils.checkpoint import checkpoint
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from evaluators.perplexity import LOGIT_CHUNK, perplexity, predicted_tokens
from finetune.checkpoint import TrainState, restore_checkpoint, save_checkpoint
from finetune.config import HealConfig
from finetune.model import causal_lm, trainable_parameters
from finetune.output import OutputFolder

Measurements = dict[str, dict[str, float]]  # text name -> perplexity, nll, tokens
FINAL_LR_FACTOR = 0.1  # cosine decay ends at lr / 10 (as nanoGPT's min_lr)


def precision(device: torch.device, dtype: torch.dtype) -> ContextManager:
    """Compute in `dtype` while the trained weights stay fp32 (mixed precision); fp32 needs nothing."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def measure(model: PreTrainedModel, texts: dict[str, torch.Tensor], batch_size: int, dtype: torch.dtype,
            progress: bool = False) -> Measurements:
    """Perplexity of the model as it stands on each held-out text (standard protocol, eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    results: Measurements = {}
    with precision(device, dtype):
        for name, blocks in texts.items():
            ppl, nll = perplexity(model, blocks, batch_size, progress)
            results[name] = {"perplexity": ppl, "nll": nll, "tokens": predicted_tokens(blocks)}
    return results


def log_measurements(board: SummaryWriter, results: Measurements, step: int) -> None:
    for name, figures in results.items():
        board.add_scalar(f"eval/{board_tag(name)}/perplexity", figures["perplexity"], step)
    board.flush()


def board_tag(name: str) -> str:
    """A text name (`ptb:test`, or a file path) as a TensorBoard tag component."""
    return re.sub(r"[^-\w.]", "_", name)


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based).

    Linear warm-up reaching the peak at the last warm-up step, then cosine decay to
    FINAL_LR_FACTOR at the last step.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - 1 - warmup)
    return FINAL_LR_FACTOR + (1 - FINAL_LR_FACTOR) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class BlockOrder:
    """Which training windows each forward pass reads.

    Every pass over the text is a fresh permutation drawn from (seed, pass number) alone, so the
    windows of any step can be recomputed on resume without saving a data-loader state.
    """

    def __init__(self, count: int, seed: int):
        self.count = count
        self.seed = seed
        self._cached: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.count))
        return self._cached[1]

    def indices(self, first: int, size: int) -> torch.Tensor:
        """Windows number first .. first+size-1 of the endless shuffled stream."""
        return torch.tensor([int(self._permutation(k // self.count)[k % self.count])
                             for k in range(first, first + size)])


def chunked_sum(loss: Callable[..., torch.Tensor], *rows: torch.Tensor) -> torch.Tensor:
    """The sum of `loss` over LOGIT_CHUNK-row chunks of `rows` (token rows: hidden states, targets).

    A chunk's [tokens, vocab] logits would be kept for the backward pass, so chunking alone bounds
    nothing in training; with more than one chunk each is recomputed in the backward pass
    (activation checkpointing), and only one chunk's logits are alive at a time. One chunk (the
    default model's batches on a CPU) is computed directly, at no extra cost.
    """
    count = rows[0].shape[0]
    if count <= LOGIT_CHUNK:
        return loss(*rows)
    return sum(checkpoint(loss, *(r[start:start + LOGIT_CHUNK] for r in rows), use_reentrant=False)
               for start in range(0, count, LOGIT_CHUNK))


def student_states(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    """The adapted decoder's final hidden states of windows ids [batch, seq_len] at every position
    that predicts a token, one row each: what every loss reads, computed once per step."""
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state  # [batch, seq_len, hidden]
    return hidden[:, :-1].reshape(-1, hidden.shape[-1])


def lm_loss(model: PreTrainedModel, states: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of windows ids, from the student's states."""
    head = model.get_output_embeddings()

    def nll(rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = head(rows).float()
        return F.cross_entropy(logits, targets.to(logits.device), reduction="sum")

    return chunked_sum(nll, states, ids[:, 1:].reshape(-1)) / predicted_tokens(ids)


def kd_loss(model: PreTrainedModel, teacher: PreTrainedModel, states: torch.Tensor, ids: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """Mean KL(teacher || student) per predicted token of windows ids, from the student's states,
    at `temperature` (scaled by its square, as Hinton et al. keep gradients comparable across
    temperatures).

    The teacher runs on each step's windows as they come, and only its final hidden states are
    kept; its logits are recomputed chunk by chunk. Cached top-k teacher logits would save that
    forward only for windows seen more than once, which a short heal on a long text rarely does.
    """
    with torch.no_grad():
        reference = teacher.model(input_ids=ids.to(teacher.device), use_cache=False).last_hidden_state
    head, teacher_head = model.get_output_embeddings(), teacher.get_output_embeddings()

    def kl(rows: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(head(rows).float() / temperature, dim=-1)
        with torch.no_grad():
            log_q = F.log_softmax(teacher_head(dense).float() / temperature, dim=-1).to(log_p.device)
        return F.kl_div(log_p, log_q, log_target=True, reduction="sum")

    dense = reference[:, :-1].reshape(-1, reference.shape[-1])
    return chunked_sum(kl, states, dense) * temperature ** 2 / predicted_tokens(ids)


def step_loss(model: PreTrainedModel, teacher: PreTrainedModel | None, ids: torch.Tensor, config: HealConfig
              ) -> torch.Tensor:
    """The loss --loss names, for windows ids: one student forward, whichever loss (mix reads
    both losses from the same states)."""
    states = student_states(model, ids)
    if config.loss == "lm":
        return lm_loss(model, states, ids)
    assert teacher is not None, "kd and mix need the dense model as teacher"
    kd = kd_loss(model, teacher, states, ids, config.kd_temperature)
    if config.loss == "kd":
        return kd
    return config.kd_weight * kd + (1 - config.kd_weight) * lm_loss(model, states, ids)


def train(model: PeftModel | PreTrainedModel, train_blocks: torch.Tensor, eval_blocks: dict[str, torch.Tensor], config: HealConfig,
          dtype: torch.dtype, folder: OutputFolder, board: SummaryWriter, state: TrainState,
          resume_from: Path | None = None, progress: bool = True, teacher: PreTrainedModel | None = None) -> TrainState:
    """Train the adapter for the configured steps, from `state.step` on, and return the final state.

    `train_blocks` [n, seq_len] are the training windows; `resume_from` is a checkpoint folder
    whose weights, optimizer, schedule and random states replace the fresh ones; `teacher` is
    the dense model that --loss kd and mix distil.
    """
    # -- optimizer and schedule -------------------------------------------------------------
    parameters = trainable_parameters(model)
    decoder = causal_lm(model)  # the causal LM, with the adapter layers (if any) inside it
    device = next(decoder.parameters()).device
    # no weight decay: it would pull the norm weights towards zero, not towards their trained values
    optimizer = torch.optim.AdamW(parameters.values(), lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, warmup=config.warmup, steps=config.steps))

    # -- resume -----------------------------------------------------------------------------
    if resume_from is not None:
        restore_checkpoint(resume_from, parameters, optimizer, scheduler)

    order = BlockOrder(train_blocks.shape[0], config.seed)
    bar = tqdm(total=config.steps, initial=state.step, desc=f"healing ({config.plan})", unit="step",
               disable=not progress, dynamic_ncols=True)
    max_norm = config.grad_clip or math.inf  # an infinite bound clips nothing but still reports the norm
    for step in range(state.step, config.steps):
        started = time.perf_counter()
        model.train()

        # -- forward and backward: grad_accum micro-batches of [batch_size, seq_len] ---------
        loss_sum = 0.0
        for micro in range(config.grad_accum):
            first = (step * config.grad_accum + micro) * config.batch_size
            ids = train_blocks[order.indices(first, config.batch_size)].to(device)
            with precision(device, dtype):
                loss = step_loss(decoder, teacher, ids, config) / config.grad_accum
            loss.backward()
            loss_sum += loss.item()

        # -- update -------------------------------------------------------------------------
        grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters.values(), max_norm))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        state.step, state.last_loss, state.seconds = step + 1, loss_sum, state.seconds + seconds

        # -- log ----------------------------------------------------------------------------
        board.add_scalar("train/loss", loss_sum, state.step)
        board.add_scalar("train/lr", lr, state.step)
        board.add_scalar("train/grad_norm", grad_norm, state.step)
        board.add_scalar("train/tokens_per_second", config.tokens_per_step / seconds, state.step)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}")

        # -- evaluate (the final measurement is taken on the merged model, after training) ----
        if config.eval_every and state.step % config.eval_every == 0 and state.step < config.steps:
            log_measurements(board, measure(decoder, eval_blocks, config.batch_size, dtype), state.step)

        # -- checkpoint (also after the last step, so that a failed export need not retrain) --
        if config.checkpoint_every and (state.step % config.checkpoint_every == 0 or state.step == config.steps):
            save_checkpoint(folder.checkpoints, parameters, optimizer, scheduler, state)
    bar.close()
    board.flush()
    return state
