"""Evaluation: a model's loss and metrics over a split, on every rank, each sample counted once. The task
gives its sums and its evaluator (dtrain/tasks); the user's extra metrics run beside them."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader

from dtrain import batches
from dtrain import world as w
from dtrain.contracts import run_metric
from dtrain.strategy.tensor import whole
from dtrain.tasks import NamedSums, Task


class ExtraMetrics:
    """A user's validation metrics, each counted over every rank's samples once. An object with
    update/compute/reset (a torchmetrics Metric, which gathers its state across ranks in compute) is fed
    every batch; a function (output, target) gives a batch's mean, weighted by its samples and summed over
    ranks."""

    def __init__(self, metrics: Mapping[str, Any], device: torch.device, group: Any = None):
        self.group = group
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
            totals = w.all_reduce_sum(self.sums.clone(), self.group).tolist()
            values.update({n: v / max(totals[-1], 1) for n, v in zip(self.functions, totals)})
        return values


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, task: Task, world: w.World,
             autocast: Callable[[], ContextManager] = contextlib.nullcontext, loss: Callable | None = None,
             limit: int = 0, classes: int = 0, bar: Callable[[Iterable], Iterable] = lambda it: it,
             extra: Mapping[str, Any] | None = None, lockstep: bool = False, group: Any = None) -> dict:
    """The task's metrics over the loader's samples on every data-parallel rank (`group`), each sample
    counted once, with what the task's evaluator adds (classification: the confusion matrix, macro F1 and
    AUC) and `extra`, the user's metrics by name. `lockstep`: every forward is a collective (a sharded
    model), so every rank runs as many as the rank with the most batches; one whose batches ran out repeats
    a batch it has seen and counts nothing."""
    was_training = model.training
    model.eval()
    sums = task.zeros(world.device)
    extras = ExtraMetrics(extra or {}, world.device, group)
    evaluator = task.evaluator(classes, world.device, group)
    for batch, counted in _batches(bar(loader), loader, world, limit, lockstep):
        x, y = batches.pair(batch)
        with autocast():
            out = batches.call(model, x)
        if not counted:  # this rank's shard is done, another's is not: the forward kept them in step
            continue
        out = out.float()  # loss and metrics in fp32 whatever the autocast dtype
        value = whole(loss(out, y) if loss is not None else task.loss(out, y, 0.0))
        out = whole(out)  # split logits (dist.loss_parallel) take the loss as they are, gathered for metrics
        sums += task.batch_sums(value, out, y)
        extras.update(out, y)
        evaluator.update(out, y)
    model.train(was_training)
    return {**task.reduce(sums, group), **extras.compute(), **evaluator.compute()}


@torch.no_grad()
def evaluate_own(model: nn.Module, call: Callable[..., Any], loader: DataLoader, world: w.World,
                 autocast: Callable[[], ContextManager] = contextlib.nullcontext, limit: int = 0,
                 bar: Callable[[Iterable], Iterable] = lambda it: it, lockstep: bool = False,
                 group: Any = None) -> dict:
    """A model with its own step: the means of what its validation_step returns (else its training_step's
    loss and scalars), each batch weighted by its sample count, over every data-parallel rank."""
    from dtrain.steps import own_validation, scalars, unpack
    was_training = model.training
    model.eval()
    method, sums = own_validation(model), NamedSums(world.device)
    for batch, counted in _batches(bar(loader), loader, world, limit, lockstep):
        with autocast():
            result = call(method, batch)
        values = scalars(result, method) if method == "validation_step" else \
            (lambda loss, rest: {"loss": loss, **rest})(*unpack(result, method))
        sums.add(values, batches.count(batch) if counted else 0)  # a padding batch names the values only
    model.train(was_training)
    return sums.reduce(group)


def _batches(items: Iterable, loader, world: w.World, limit: int, lockstep: bool) -> Iterator[tuple[Any, bool]]:
    """The loader's batches on the device, at most `limit` (0: all), each with whether it counts. In lockstep
    the ranks agree before each batch whether any still has one (one tiny all-reduce: evaluation batches are
    large), and a rank without one gets a batch it already saw, not counted."""
    it, seen, i = iter(items), None, 0
    while True:
        batch = next(it, None) if not limit or i < limit else None
        i += 1
        if lockstep and not w.max_over_ranks(int(batch is not None), world.device):
            return
        if batch is None:
            if not lockstep:
                return
            yield (seen if seen is not None else _one_batch(loader, world.device)), False
            continue
        seen = batches.to_device(batch, world.device)
        yield seen, True


def _one_batch(loader, device: torch.device) -> Any:
    """A batch of the data set's first item (for a rank whose shard of it is empty)."""
    if hasattr(loader.dataset, "batch"):  # data held as tensors (data.DeviceLoader)
        return batches.to_device(loader.dataset.batch(slice(0, 1)), device)
    collate = getattr(loader, "collate_fn", None) or torch.utils.data.default_collate
    return batches.to_device(collate([loader.dataset[0]]), device)
