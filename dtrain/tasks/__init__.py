"""The tasks, a registry of Task protocols (dtrain/tasks/base.py): classification, regression, segmentation and
language modelling, one module each, and `free` (items that are not (input, target) pairs, for a model with
its own training_step). A data set names its task (`Splits.task`; `data.task` for a user's data set or
data=csv, else the targets' dtype decides); everything else asks the Task. `register` adds one from outside dtrain.

The monitor, `checkpoint.monitor`, is any validation metric a run reports (`val_loss`, `val_f1`, a user's
`val_NAME`), with `checkpoint.mode` (auto: lower is better for names ending in `loss` or `perplexity`)."""

from __future__ import annotations

import math
from typing import Any, Optional

from dtrain.errors import ConfigError, ContractError
from dtrain.tasks.base import EpochSums, Evaluator, NamedSums, Task
from dtrain.tasks.classification import Classification, is_integer, macro_auc, macro_f1, predict_samples
from dtrain.tasks.language_modeling import LanguageModeling
from dtrain.tasks.regression import Regression
from dtrain.tasks.segmentation import Segmentation

class Free(Task):
    """Items that are not (input, target) pairs, for a model that takes the batch as it is with its own
    training_step: the task has no loss or metrics of its own."""
    name = "free"

    def loss(self, out: Any, y: Any, label_smoothing: float = 0.0, reduction: str = "mean") -> Any:
        raise ContractError("model: the data's items are not (input, target) pairs, so the model must train on "
                            "the batch itself: define training_step(self, batch) returning its loss")

    def outputs(self, source: Any, train: Any, y: Any) -> tuple[Optional[list[str]], int]:
        return None, 0


TASKS: dict[str, Task] = {task.name: task for task in (Classification(), Regression(), Segmentation(),
                                                       LanguageModeling(), Free())}


def register(task: Task) -> Task:
    """Add a task by its name (a Task subclass's instance), as dtrain's own are registered."""
    TASKS[task.name] = task
    return task


def get(name: str, key: str = "data.task") -> Task:
    if name not in TASKS:
        raise ConfigError(f"{key}={name!r} is not allowed: choose one of {', '.join(sorted(TASKS))}")
    return TASKS[name]


def of_targets(y: Any) -> str:
    """The task of a data set whose task is not named: its first target's dtype decides (integers:
    classification, else regression; no target: free)."""
    if y is None:
        return Free.name
    return Classification.name if is_integer(y) else Regression.name


def check_monitor(asked: str) -> None:
    if asked != "auto" and not asked.startswith("val_"):
        raise ConfigError(f"checkpoint.monitor={asked} is not allowed: a validation metric, val_NAME (val_loss, "
                          f"val_acc, ... or one of your own metrics), or auto")


def monitor(asked: str, task: Task, reported: tuple[str, ...] | None = None) -> str:
    """The validation metric the best checkpoint is chosen by: `asked` (val_NAME), or the task's own for auto.
    `reported`: the names validation reports (val_*), where known before the first validation."""
    check_monitor(asked)
    chosen = task.monitor if asked == "auto" else asked
    if reported is not None and chosen not in reported:
        raise ConfigError(f"checkpoint.monitor={chosen} is not a metric this run reports; choose one of "
                          f"{', '.join(reported)} (a {task.name} task, with your metrics)")
    return chosen


def monitored(metrics: dict, monitor: str, optional: bool = False) -> Optional[float]:
    """The monitored metric's value in a validation's `metrics` (val_NAME -> metrics[NAME]). A name the run
    does not report is one line listing those it does; None where it is `optional` (a model's own steps,
    checkpoint.monitor=auto: val_loss if its validation reports a loss)."""
    name = monitor.removeprefix("val_")
    if name in metrics:
        return metrics[name]
    if optional:
        return None
    reported = ", ".join(f"val_{k}" for k, v in metrics.items() if k not in ("samples", "units")
                         and isinstance(v, (int, float)))
    raise ConfigError(f"checkpoint.monitor={monitor} is not a metric this run reports; choose one of {reported}")


class Best:
    """The best value of a monitored metric so far, in its direction: what the best checkpoint and early
    stopping both follow. A NaN or infinite value never improves."""

    def __init__(self, higher_is_better: bool, value: Optional[float] = None):
        self.higher_is_better, self.value = higher_is_better, value

    def offer(self, value: float, min_delta: float = 0.0) -> bool:
        """Take `value` if it beats the best by more than `min_delta`; whether it did."""
        if not math.isfinite(value):
            return False
        gain = math.inf if self.value is None else \
            (value - self.value if self.higher_is_better else self.value - value)
        if gain > min_delta:
            self.value = value
            return True
        return False


def higher_is_better(metric: str, mode: str = "auto") -> bool:
    """checkpoint.mode: max, min, or auto (lower is better for a loss or a perplexity, else higher)."""
    if mode != "auto":
        return mode == "max"
    return not metric.endswith(("loss", "perplexity"))


__all__ = ["Task", "Evaluator", "EpochSums", "NamedSums", "TASKS", "register", "get", "of_targets", "check_monitor",
           "monitor", "monitored", "higher_is_better", "Best", "Classification", "Regression", "Segmentation",
           "LanguageModeling", "macro_f1", "macro_auc", "predict_samples"]
