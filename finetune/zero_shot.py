"""Zero-shot accuracy through lm-evaluation-harness, on the model in memory.

Perplexity says how well the compact model predicts text; users also compare pruned models on
the harness's multiple-choice tasks (ARC, HellaSwag, PIQA...). Tasks are checked, and their
data loaded, before any training, so that a task whose data set cannot be reached costs a
second and one line, not a traceback after the run.
"""
from __future__ import annotations

from functools import cache
from typing import Any, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

Scores = dict[str, dict[str, float]]  # task -> metric ("acc,none", ...) -> value


class TaskError(ValueError):
    """A task the harness does not know, or whose data set cannot be loaded."""


@cache
def task_manager(tasks_path: str | None):
    """The harness's task index (it reads every task file it ships: seconds), built once per run."""
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=tasks_path) if tasks_path else TaskManager()


def check_tasks(names: Sequence[str], tasks_path: str | None) -> None:
    """Refuse an unknown task, or one whose data set cannot be loaded, naming it."""
    from lm_eval.tasks import get_task_dict

    manager = task_manager(tasks_path)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        where = f" (nor in --tasks-path {tasks_path})" if tasks_path else ""
        raise TaskError(f"unknown lm-eval task(s): {', '.join(unknown)}{where}; `lm_eval ls tasks` lists them")
    for name in names:
        try:
            get_task_dict([name], manager)
        except Exception as error:  # datasets raises many kinds: connection, missing files, bad config
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise TaskError(f"lm-eval task {name}: its data set cannot be loaded ({type(error).__name__}: {reason}); "
                            "run where it is cached or reachable, or leave it out of --tasks") from None


def zero_shot(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, names: Sequence[str],
              tasks_path: str | None, batch_size: int, limit: int, seed: int) -> Scores:
    """Each task's numeric metrics (accuracy and its standard error, ...) for the model as it stands."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    model.eval()
    device = next(model.parameters()).device
    harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    with torch.no_grad():
        results = simple_evaluate(model=harness_model, tasks=list(names), task_manager=task_manager(tasks_path),
                                  limit=limit or None, log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed)
    return {task: numeric(metrics) for task, metrics in results["results"].items()}


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "sample_len"}


def score_lines(before: Scores, after: Scores | None) -> list[str]:
    """One line per task and accuracy metric: before (and after healing)."""
    lines = []
    for task, metrics in before.items():
        for metric, value in metrics.items():
            if "stderr" in metric:
                continue
            change = "" if after is None else f" -> {after[task][metric]:.4f}"
            lines.append(f"  {task} {metric.split(',')[0]}  {value:.4f}{change}")
    return lines
