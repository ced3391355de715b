"""What training optimises and measures besides the task's own: the loss and the extra validation metrics,
from the config's `_target_`s or the objects dtrain.fit was given. Training (dtrain/build.py) and using a
trained model (dtrain/inference.py) both take them from here."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from dtrain import plugins
from dtrain.config import Config
from dtrain.errors import ConfigError
from dtrain.tasks import Task


def make_loss(cfg: Config, task: Task, given: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss: dtrain.fit's, the config's `loss: {_target_: ...}`, or the task's own."""
    loss = given if given is not None else (
        plugins.function_or_instance("loss", cfg.loss, positional=2) if cfg.loss is not None else None)
    if loss is None:
        return lambda out, y: task.loss(out, y, cfg.trainer.label_smoothing)
    if not callable(loss):
        raise ConfigError(f"loss: {type(loss).__name__} is not callable; give an nn.Module loss or a function "
                          "(output, target) -> scalar")
    return loss


def make_metrics(cfg: Config, given: Optional[dict], device: torch.device) -> dict[str, Any]:
    """Extra validation metrics by name: torchmetrics-like objects (update/compute/reset) or functions
    (output, target) -> a batch's mean value."""
    metrics = dict(given) if given is not None else {
        name: plugins.function_or_instance(f"metrics.{name}", target, positional=2)
        for name, target in cfg.metrics.items()}
    for name, metric in metrics.items():
        if not callable(metric) and not all(hasattr(metric, m) for m in ("update", "compute", "reset")):
            raise ConfigError(f"metrics.{name}: a {type(metric).__name__} is neither a metric object (update, "
                              "compute, reset) nor a function (output, target) -> value")
        if isinstance(metric, nn.Module):
            metric.to(device)
    return metrics
