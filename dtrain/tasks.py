"""What is learned and how it is measured: the task table, autocast, and evaluation.

A task says which loss trains the model, which per-batch sums it keeps, and which metrics those sums
become once reduced over all ranks. The training loop, evaluation and the summary read metric names from
here and never test a task's name. Sums are kept on the device in float64 as [loss sum, count, *extras],
so accumulating them never synchronises the host.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from dtrain import world as w
from dtrain.config import Monitor, Precision
from dtrain.errors import ConfigError


@dataclass(frozen=True)
class Task:
    name: str
    loss: Callable[..., torch.Tensor]  # (out, y, label_smoothing, reduction) -> loss
    extras: tuple[str, ...]  # metrics beyond the loss, each a mean over samples
    extra_sums: Callable[[torch.Tensor, torch.Tensor], list[torch.Tensor]]  # (out, y) -> one sum per extra
    monitor: str  # the default metric best.pt is chosen by

    @property
    def metrics(self) -> tuple[str, ...]:
        return ("loss", *self.extras)

    def higher_is_better(self, metric: str) -> bool:
        return not metric.endswith("loss")

    def monitor_for(self, asked: Monitor, data_name: str) -> str:
        """The validation metric best.pt is chosen by: `asked`, or the task's own for Monitor.auto."""
        monitor = self.monitor if asked == Monitor.auto else asked.value
        if monitor.removeprefix("val_") not in self.metrics:
            raise ConfigError(f"checkpoint.monitor={monitor} but data={data_name} is a {self.name} task; "
                              f"use checkpoint.monitor={self.monitor}")
        return monitor

    def batch_sums(self, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[loss sum, count, *extras] of one batch whose mean loss is `loss`."""
        n = torch.tensor(float(len(y)), dtype=torch.float64, device=loss.device)
        return torch.stack([loss.double() * n, n, *(s.double() for s in self.extra_sums(out, y))])

    def zeros(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(2 + len(self.extras), dtype=torch.float64, device=device)

    def reduce(self, sums: torch.Tensor) -> dict[str, float]:
        """This rank's sums -> means over every rank's samples (one all-reduce, one host sync)."""
        values = w.all_reduce_sum(sums.clone()).tolist()
        n = max(values[1], 1)
        return {"loss": values[0] / n, "samples": int(values[1]),
                **{name: v / n for name, v in zip(self.extras, values[2:])}}


TASKS: dict[str, Task] = {
    "classification": Task(
        "classification",
        loss=lambda out, y, label_smoothing=0.0, reduction="mean": F.cross_entropy(
            out, y, label_smoothing=label_smoothing, reduction=reduction),
        extras=("acc",), extra_sums=lambda out, y: [(out.argmax(1) == y).sum()], monitor="val_acc"),
    "regression": Task(
        "regression",
        loss=lambda out, y, label_smoothing=0.0, reduction="mean": F.mse_loss(out, y, reduction=reduction),
        extras=(), extra_sums=lambda out, y: [], monitor="val_loss"),
}


def autocast(device: torch.device, precision: Precision):
    if precision == Precision.fp32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == Precision.bf16 else torch.float16)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, task: Task, world: w.World,
             precision: Precision = Precision.fp32, label_smoothing: float = 0.0,
             limit: int = 0) -> dict[str, float]:
    """The task's metrics over the loader's samples on all ranks, each sample counted once."""
    was_training = model.training
    model.eval()
    sums = task.zeros(world.device)
    for i, (x, y) in enumerate(loader):
        if limit and i >= limit:
            break
        x, y = x.to(world.device, non_blocking=True), y.to(world.device, non_blocking=True)
        with autocast(world.device, precision):
            out = model(x)
        out = out.float()  # loss and metrics in fp32 whatever the autocast dtype
        sums += task.batch_sums(task.loss(out, y, label_smoothing), out, y)
    model.train(was_training)
    return task.reduce(sums)
