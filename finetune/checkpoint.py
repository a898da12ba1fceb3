"""Training checkpoints that resume exactly and execute no code when read.

Tensors go to safetensors files, everything else to JSON (nothing is pickled):

    checkpoints/step-000050/trainable.safetensors   adapter + norm weights, by parameter name
    checkpoints/step-000050/optimizer.safetensors   AdamW moments and step counts, as "<index>.<name>"
    checkpoints/step-000050/rng.safetensors         torch CPU (and CUDA) generator states
    checkpoints/step-000050/state.json              step, settings, optimizer groups, scheduler, ...
    checkpoints/latest.json                         {"folder": "step-000050"}

A step folder is written under a temporary name and renamed when complete; `latest.json` is
replaced atomically after that, so a crash at any moment leaves the previous checkpoint intact.
The data order needs no state: it is a function of the seed and the step.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from gaprune.files import write_json_atomic

FORMAT = "gaprune.heal-checkpoint"
FORMAT_VERSION = 1
POINTER = "latest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not belong to this run."""


@dataclass
class TrainState:
    """Where a run stands, beyond its tensors."""

    step: int  # optimizer steps done
    config: dict[str, Any]  # HealConfig.to_dict() of the run
    before: dict[str, dict[str, float]]  # held-out measurements of the compact model before training
    last_loss: float | None  # training loss of the last step
    seconds: float  # training wall time so far
    zero_shot_before: dict[str, dict[str, float]] | None = None  # lm-eval scores before training (--tasks)


def save_checkpoint(root: Path, parameters: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, state: TrainState) -> Path:
    """Write a complete checkpoint for `state.step` and make it the one `--resume` reads."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state.step:06d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        save_file({key: value.detach().cpu().contiguous() for key, value in parameters.items()},
                  staging / "trainable.safetensors")
        moments, groups = _flatten_optimizer(optimizer)
        save_file(moments, staging / "optimizer.safetensors")
        save_file(_rng_states(), staging / "rng.safetensors")
        write_json_atomic(staging / "state.json", {
            "format": FORMAT, "format_version": FORMAT_VERSION, **asdict(state),
            "parameters": list(parameters), "optimizer_groups": groups, "scheduler": scheduler.state_dict(),
        })
        target = root / name
        shutil.rmtree(target, ignore_errors=True)  # only an orphan of a crash can sit here: latest.json never named it
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_json_atomic(root / POINTER, {"folder": name})
    for old in root.iterdir():
        if old.is_dir() and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return target


def read_state(root: Path) -> tuple[TrainState, Path] | None:
    """The state of the latest checkpoint under `root` and its folder, or None when there is none."""
    pointer = root / POINTER
    if not pointer.is_file():
        return None
    try:
        folder = root / json.loads(pointer.read_text())["folder"]
        data = json.loads((folder / "state.json").read_text())
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint in {root} is unreadable ({error})") from None
    if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder} is not a gaprune healing checkpoint of version {FORMAT_VERSION}")
    state = TrainState(**{key: data[key] for key in TrainState.__dataclass_fields__ if key in data})
    return state, folder


def restore_checkpoint(folder: Path, parameters: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                       scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Put weights, optimizer, schedule and random generators back as they were at the checkpoint."""
    data = json.loads((folder / "state.json").read_text())
    if data["parameters"] != list(parameters):
        raise CheckpointError(f"{folder} holds other trainable parameters than this run's adapter")
    weights = load_file(folder / "trainable.safetensors")
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(weights[name])
    optimizer.load_state_dict(_unflatten_optimizer(load_file(folder / "optimizer.safetensors"),
                                                   data["optimizer_groups"]))
    scheduler.load_state_dict(data["scheduler"])
    _set_rng_states(load_file(folder / "rng.safetensors"))


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """AdamW's per-parameter tensors as flat named tensors, and its groups (plain numbers) for JSON."""
    body = optimizer.state_dict()
    tensors = {f"{index}.{key}": value.detach().cpu().contiguous()
               for index, entries in body["state"].items() for key, value in entries.items()}
    return tensors, body["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    # JSON turned tuples such as betas into lists; "params" is the one list the optimizer wants as a list
    groups = [{key: tuple(value) if isinstance(value, list) and key != "params" else value
               for key, value in group.items()} for group in groups]
    return {"state": state, "param_groups": groups}


def _rng_states() -> dict[str, torch.Tensor]:
    """The generators that dropout draws from; Python's and numpy's are not used in training."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda.{index}": state for index, state in enumerate(torch.cuda.get_rng_state_all())})
    return states


def _set_rng_states(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    cuda = [states[f"cuda.{index}"] for index in range(len(states) - 1)]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
