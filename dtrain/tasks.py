"""What is learned and how it is measured: the task table and evaluation.

A task says which loss trains the model, which per-batch sums it keeps, and which metrics those sums
become once reduced over all ranks. The training loop, evaluation and the summary read metric names from
here and never test a task's name. Sums are kept on the device in float64 as [loss sum, count, *extras],
so accumulating them never synchronises the host.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable, Iterator, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from dtrain import world as w
from dtrain.contracts import run_metric
from dtrain.config import Monitor
from dtrain.errors import ConfigError, DataError


@dataclass(frozen=True)
class Task:
    name: str
    loss: Callable[..., torch.Tensor]  # (out, y, label_smoothing, reduction) -> loss
    extras: tuple[str, ...]  # metrics beyond the loss, each a mean over samples
    extra_sums: Callable[[torch.Tensor, torch.Tensor], list[torch.Tensor]]  # (out, y) -> one sum per extra
    monitor: str  # the default metric best.pt is chosen by
    # (outputs, targets, classes) of a first batch -> what breaks the task's contract with the model, or None
    check: Callable[[torch.Tensor, torch.Tensor, int], Optional[str]]
    classifies: bool = False  # outputs are class scores: a confusion matrix and predictions make sense

    @property
    def metrics(self) -> tuple[str, ...]:
        """What training reports (train_*), from per-batch sums."""
        return ("loss", *self.extras)

    @property
    def eval_metrics(self) -> tuple[str, ...]:
        """What evaluation reports (val_*, test_*): classification adds macro F1 and macro AUC-ROC."""
        return (*self.metrics, *(("f1", "auc") if self.classifies else ()))

    def higher_is_better(self, metric: str) -> bool:
        return not metric.endswith("loss")

    def monitor_for(self, asked: Monitor, data_name: str) -> str:
        """The validation metric best.pt is chosen by: `asked`, or the task's own for Monitor.auto."""
        monitor = self.monitor if asked == Monitor.auto else asked.value
        if monitor.removeprefix("val_") not in self.eval_metrics:
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


class EpochSums:
    """A rank's running [loss sum, count, *extras] for an epoch, kept without host syncs and with few
    device ops per step. Each batch's mean loss is held as it comes; its outputs and targets too, while
    they are small, so the extras (accuracy: argmax, compare, count) are computed for many batches at
    once rather than three small ops per step, which on a small model cost as much as a layer. All is
    folded into the float64 totals when the held outputs reach `hold_bytes`, and when read (at the
    epoch's end, or for a checkpoint)."""

    def __init__(self, task: Task, device: torch.device, hold_bytes: int = 1 << 20):
        self.task, self.total, self.hold_bytes = task, task.zeros(device), hold_bytes
        self.losses: list[torch.Tensor] = []  # each batch's mean loss
        self.counts: list[int] = []  # and its samples
        self.outputs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (outputs, targets) not yet in the extras
        self.extras: list[torch.Tensor] = []  # extra sums of folded outputs, [len(task.extras)] each
        self.held = 0  # bytes of self.outputs

    def add(self, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> None:
        self.losses.append(loss.detach())
        self.counts.append(y.shape[0])
        if self.task.extras:
            self.outputs.append((out.detach(), y))
            # What holding them keeps alive: a view's whole storage (a model may return part of a tensor).
            self.held += out.untyped_storage().nbytes() + y.untyped_storage().nbytes()
            if self.held >= self.hold_bytes:
                self._fold_outputs()

    def _fold_outputs(self) -> None:
        if not self.outputs:
            return
        outs, ys = zip(*self.outputs)
        try:  # one batch (large outputs fold at once) needs no copy
            batches = [(torch.cat(outs), torch.cat(ys))] if len(outs) > 1 else self.outputs
        except RuntimeError:  # shapes that differ past the batch dimension (sequences of varying length)
            batches = self.outputs
        for out, y in batches:
            self.extras.append(torch.stack([s.double() for s in self.task.extra_sums(out, y)]))
        self.outputs.clear()
        self.held = 0

    def value(self) -> torch.Tensor:
        self._fold_outputs()
        if self.losses:
            n = torch.tensor(self.counts, dtype=torch.float64, device=self.total.device)
            self.total[:2] += torch.stack([(torch.stack(self.losses).double() * n).sum(), n.sum()])
            self.losses.clear()
            self.counts.clear()
        if self.extras:
            self.total[2:] += torch.stack(self.extras).sum(0)
            self.extras.clear()
        return self.total

    def reset(self, total: torch.Tensor | None = None) -> None:
        self.losses.clear()
        self.counts.clear()
        self.outputs.clear()
        self.extras.clear()
        self.held = 0
        self.total.copy_(total) if total is not None else self.total.zero_()


def _cross_entropy(out: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0,
                   reduction: str = "mean") -> torch.Tensor:
    try:
        return F.cross_entropy(out, y, label_smoothing=label_smoothing, reduction=reduction)
    except IndexError as e:  # a label past the outputs, in a batch after the first (on the CPU; CUDA asserts)
        raise DataError(f"a class label is out of range for the model's {out.shape[1]} outputs ({e}); labels must "
                        f"be 0..{out.shape[1] - 1}") from None


def _classification_problem(out: torch.Tensor, y: torch.Tensor, classes: int) -> Optional[str]:
    if out.ndim != 2 or out.shape[1] != classes:
        return (f"the model's outputs have shape {list(out.shape)} but the data has {classes} classes: a classifier "
                f"returns scores of shape [N, {classes}] (a model factory taking num_classes= is given it)")
    if y.is_floating_point() or y.ndim != 1:
        return (f"the targets are {y.dtype} of shape {list(y.shape)}: classification needs integer class labels of "
                "shape [N] (or data.task=regression)")
    lo, hi = int(y.min()), int(y.max())  # one host sync, on the first batch only
    if lo < 0 or hi >= classes:
        return f"a class label is {lo if lo < 0 else hi}, outside 0..{classes - 1} (the data has {classes} classes)"
    return None


def _regression_problem(out: torch.Tensor, y: torch.Tensor, classes: int) -> Optional[str]:
    if out.shape[:1] != y.shape[:1] or out.numel() != y.numel():
        return (f"the model's outputs have shape {list(out.shape)} but the targets {list(y.shape)}: a regression "
                "model returns one value per target")
    return None


TASKS: dict[str, Task] = {
    "classification": Task(
        "classification", loss=_cross_entropy,
        extras=("acc",), extra_sums=lambda out, y: [(out.argmax(1) == y).sum()], monitor="val_acc",
        check=_classification_problem, classifies=True),
    "regression": Task(
        "regression",
        loss=lambda out, y, label_smoothing=0.0, reduction="mean": F.mse_loss(out, _as_output(y, out),
                                                                               reduction=reduction),
        extras=(), extra_sums=lambda out, y: [], monitor="val_loss", check=_regression_problem),
}


def _as_output(y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Regression targets shaped like the outputs: a data set's scalar targets [N] against outputs [N, 1]."""
    return y.reshape(out.shape).to(out.dtype) if y.numel() == out.numel() else y


def macro_f1(confusion: torch.Tensor) -> float:
    """The mean F1 over the classes that occur as a label or a prediction (confusion rows: true class)."""
    c = confusion.double()
    tp = c.diag()
    counted = 2 * tp + (c.sum(0) - tp) + (c.sum(1) - tp)  # 2 TP + FP + FN
    seen = counted > 0
    return float((2 * tp[seen] / counted[seen]).mean()) if seen.any() else math.nan


def macro_auc(scores: torch.Tensor, y: torch.Tensor) -> float:
    """The mean one-vs-rest AUC-ROC over the classes with both positive and negative samples, exactly: the
    chance that a sample of the class scores higher on it than a sample outside it, ties counting half
    (the Mann-Whitney statistic, from the average ranks of the scores). NaN when no class qualifies."""
    n, classes = scores.shape
    values, order = scores.double().sort(0)  # each column ascending
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[1:] = values[1:] != values[:-1]  # the first of each run of equal scores
    group = starts.cumsum(0) - 1 + torch.arange(classes, device=scores.device) * n  # a tie group id per column
    ranks = torch.arange(1, n + 1, dtype=torch.float64, device=scores.device)[:, None].expand(n, classes)
    flat = group.flatten()
    sums = torch.zeros(n * classes, dtype=torch.float64, device=scores.device).index_add_(0, flat, ranks.flatten())
    counts = torch.zeros_like(sums).index_add_(0, flat, torch.ones_like(ranks).flatten())
    average = (sums / counts.clamp_min(1))[group]  # ties share their average rank
    positive = y[order] == torch.arange(classes, device=scores.device)  # [n, classes], in sorted order
    p = positive.sum(0).double()
    auc = ((average * positive).sum(0) - p * (p + 1) / 2) / (p * (n - p))
    valid = (p > 0) & (p < n)
    return float(auc[valid].mean()) if valid.any() else math.nan


class ExtraMetrics:
    """A user's validation metrics, each counted over every rank's samples once. An object with
    update/compute/reset (a torchmetrics Metric, which gathers its state across ranks in compute) is fed
    every batch; a function (output, target) gives a batch's mean, weighted by its samples and summed over
    ranks."""

    def __init__(self, metrics: Mapping[str, Any], device: torch.device):
        self.stateful = {n: m for n, m in metrics.items() if hasattr(m, "update") and hasattr(m, "compute")}
        self.functions = {n: m for n, m in metrics.items() if n not in self.stateful}
        self.sums = torch.zeros(len(self.functions) + 1, dtype=torch.float64, device=device)  # ..., count
        for m in self.stateful.values():
            m.reset()

    def update(self, out: torch.Tensor, y: torch.Tensor) -> None:
        for name, m in self.stateful.items():
            run_metric(name, lambda: m.update(out, y))
        if self.functions:
            n = len(y)
            values = [torch.as_tensor(run_metric(name, lambda: f(out, y)), dtype=torch.float64,
                                      device=self.sums.device) * n for name, f in self.functions.items()]
            self.sums += torch.stack([*values, torch.tensor(float(n), dtype=torch.float64, device=self.sums.device)])

    def compute(self) -> dict[str, float]:
        values = {}
        for name, m in self.stateful.items():
            values[name] = float(run_metric(name, m.compute))
            m.reset()
        if self.functions:
            totals = w.all_reduce_sum(self.sums.clone()).tolist()
            values.update({n: v / max(totals[-1], 1) for n, v in zip(self.functions, totals)})
        return values


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, task: Task, world: w.World,
             autocast: Callable[[], ContextManager] = contextlib.nullcontext, loss: Callable | None = None,
             limit: int = 0, classes: int = 0, bar: Callable[[Iterable], Iterable] = lambda it: it,
             extra: Mapping[str, Any] | None = None, lockstep: bool = False) -> dict:
    """The task's metrics over the loader's samples on all ranks, each sample counted once. With
    `classes`, also the confusion matrix (rows: true class, columns: predicted), summed over ranks, its
    macro F1, and the macro AUC-ROC of every rank's class probabilities gathered together (exact AUC needs
    all the scores; F1 needs only the summed confusion matrix). `extra`: the user's metrics by name.
    `lockstep`: every forward is a collective (a sharded model), so every rank runs as many as the rank
    with the most batches; one whose batches ran out repeats a batch it has seen and counts nothing."""
    was_training = model.training
    model.eval()
    sums = task.zeros(world.device)
    extras = ExtraMetrics(extra or {}, world.device)
    confusion = torch.zeros(classes * classes, dtype=torch.int64, device=world.device)
    scores, labels = [], []
    for x, y in _batches(bar(loader), loader, world, limit, lockstep):
        if y is None:  # this rank's shard is done, another's is not: a forward to keep them in step
            with autocast():
                model(x)
            continue
        with autocast():
            out = model(x)
        out = out.float()  # loss and metrics in fp32 whatever the autocast dtype
        sums += task.batch_sums(loss(out, y) if loss is not None else task.loss(out, y, 0.0), out, y)
        extras.update(out, y)
        if classes:
            confusion += torch.bincount(y * classes + out.argmax(1), minlength=classes * classes)
            scores.append(out.softmax(1))
            labels.append(y)
    model.train(was_training)
    metrics: dict = {**task.reduce(sums), **extras.compute()}
    if classes:
        confusion = w.all_reduce_sum(confusion).view(classes, classes)
        metrics["confusion"] = confusion.tolist()
        metrics["f1"] = macro_f1(confusion)
        empty = torch.zeros(0, classes, device=world.device), torch.zeros(0, dtype=torch.int64, device=world.device)
        metrics["auc"] = macro_auc(w.all_gather_rows(torch.cat(scores) if scores else empty[0]),
                                   w.all_gather_rows(torch.cat(labels) if labels else empty[1]))
    return metrics


def _batches(batches: Iterable, loader, world: w.World, limit: int, lockstep: bool) -> Iterator[tuple[Any, Any]]:
    """The loader's (x, y) on the device, at most `limit` batches (0: all). In lockstep the ranks agree
    before each batch whether any still has one (one tiny all-reduce: evaluation batches are large), and a
    rank without one gets (a batch it already saw, None)."""
    it, seen, i = iter(batches), None, 0
    while True:
        batch = next(it, None) if not limit or i < limit else None
        i += 1
        if lockstep and not w.max_over_ranks(int(batch is not None), world.device):
            return
        if batch is None:
            if not lockstep:
                return
            yield (seen if seen is not None else _first_input(loader, world.device)), None
            continue
        x, y = batch
        seen = x = x.to(world.device, non_blocking=True)
        yield x, y.to(world.device, non_blocking=True)


def _first_input(loader, device: torch.device) -> torch.Tensor:
    """A batch of the data set's first input (for a rank whose shard of it is empty)."""
    x = loader.dataset[0][0]
    return torch.as_tensor(x).unsqueeze(0).to(device)


@torch.no_grad()
def predict_samples(model: nn.Module, dataset, device: torch.device, n: int = 16) -> dict:
    """The first `n` samples of `dataset` with the model's predictions, as images to look at: uint8,
    channels last, each rescaled to its own range (what normalisation did is undone well enough to see)."""
    was_training = model.training
    model.eval()
    x, y = map(torch.stack, zip(*(map(torch.as_tensor, dataset[i]) for i in range(min(n, len(dataset))))))
    predicted = model(x.to(device)).float().argmax(1).cpu()
    x, y = x.cpu(), y.cpu()
    model.train(was_training)
    lo = x.flatten(1).min(1).values.view(-1, 1, 1, 1)
    hi = x.flatten(1).max(1).values.view(-1, 1, 1, 1)
    images = ((x - lo) / (hi - lo).clamp_min(1e-8) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    return {"images": images.numpy(), "labels": y.numpy(), "predicted": predicted.numpy()}
