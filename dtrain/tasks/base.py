"""The Task protocol: what is learned and how it is measured, for one kind of target. A task says which loss
trains the model, which per-batch sums it keeps and what one sample counts as in them, which metrics those
sums become once reduced over the data-parallel ranks (and which only evaluation computes), how it reads its
targets and classes from a data set, what it offers a model factory, and how predictions are written. The
loop, evaluation, the data sets and inference call these and never test a task's name.

Sums are kept on the device in float64 as [loss sum, units, samples, *extras] (a unit is what the loss and
the extras average over: a sample, a pixel, a token; samples count the batch for throughput), so accumulating
them never synchronises the host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Optional

import torch

from dtrain import world as w


class Evaluator:
    """Metrics only evaluation computes (over every rank's samples), beside the task's sums."""
    names: tuple[str, ...] = ()

    def update(self, out: torch.Tensor, y: torch.Tensor) -> None:
        ...

    def compute(self) -> dict[str, Any]:
        return {}


class Task:
    name: ClassVar[str] = ""
    extras: ClassVar[tuple[str, ...]] = ()  # metrics beyond the loss, each a mean over the task's units
    evaluated: ClassVar[tuple[str, ...]] = ()  # metrics evaluation alone reports (its Evaluator's)
    monitor: ClassVar[str] = "val_loss"  # the metric the best checkpoint is chosen by when checkpoint.monitor=auto
    classifies: ClassVar[bool] = False  # outputs are class scores: a confusion matrix and a sample grid make sense

    # -- training ---------------------------------------------------------------------------------------------

    def loss(self, out: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0,
             reduction: str = "mean") -> torch.Tensor:
        raise NotImplementedError

    def extra_sums(self, out: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """One sum per name of `extras` over this batch's units."""
        return []

    unit: ClassVar[str] = "sample"  # what `units` counts; a task whose unit is not the sample reports UNITs_per_sec

    def units(self, y: torch.Tensor) -> int | torch.Tensor:
        """What the batch's mean loss averages over, as a count: samples (pixels or tokens for other tasks; a
        tensor on the device where it depends on the targets, e.g. those not ignored)."""
        return y.shape[0]

    def derived(self, means: dict[str, float]) -> dict[str, float]:
        """Metrics computed from the reduced means (a perplexity from the loss)."""
        return {}

    def check(self, out: torch.Tensor, y: torch.Tensor, classes: int) -> Optional[str]:
        """What breaks the task's contract with the model in a first batch, or None."""
        return None

    derived_names: ClassVar[tuple[str, ...]] = ()  # what `derived` adds

    @property
    def metrics(self) -> tuple[str, ...]:
        """What training reports (train_*), from per-batch sums."""
        return ("loss", *self.extras, *self.derived_names)

    @property
    def eval_metrics(self) -> tuple[str, ...]:
        """What evaluation reports (val_*, test_*)."""
        return (*self.metrics, *self.evaluated)

    def batch_sums(self, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[loss sum, units, samples, *extras] of one batch whose mean loss is `loss`."""
        n = torch.as_tensor(self.units(y), dtype=torch.float64, device=loss.device)
        samples = torch.tensor(float(y.shape[0]), dtype=torch.float64, device=loss.device)
        return torch.stack([loss.double() * n, n, samples, *(s.double() for s in self.extra_sums(out, y))])

    def zeros(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(3 + len(self.extras), dtype=torch.float64, device=device)

    def reduce(self, sums: torch.Tensor, group: Any = None) -> dict[str, float]:
        """This rank's sums -> means over every data-parallel rank's units (one all-reduce, one host sync)."""
        values = w.all_reduce_sum(sums.clone(), group).tolist()
        n = max(values[1], 1)
        means = {"loss": values[0] / n, **{name: v / n for name, v in zip(self.extras, values[3:])}}
        return {**means, **self.derived(means), "samples": int(values[2]), "units": values[1]}

    def evaluator(self, classes: int, device: torch.device, group: Any = None) -> Evaluator:
        return Evaluator()

    # -- the data ---------------------------------------------------------------------------------------------

    def target_problem(self, y: Any) -> Optional[str]:
        """What makes a data set's target (its first item's) unfit for this task, or None."""
        return None

    def outputs(self, source: Any, train: Any, y: Any) -> tuple[Optional[list[str]], int]:
        """(class names or None, the number of outputs) a model needs for this data set."""
        raise NotImplementedError

    def table_targets(self, path: Path, header: list[str], rows: list[list[str]], column: str):
        """A CSV column as this task's targets: (targets tensor, outputs, class names or None)."""
        raise NotImplementedError

    def offers(self, outputs: int) -> dict[str, Any]:
        """What a model factory is offered beyond input_shape and num_outputs."""
        return {}

    def class_names(self, names: Optional[list[str]], outputs: int) -> Optional[list[str]]:
        """The class names a checkpoint records (None: the task has no classes)."""
        return None

    # -- a trained model ---------------------------------------------------------------------------------

    def predict(self, out: torch.Tensor) -> torch.Tensor:
        """What a prediction is, from the model's outputs (class probabilities, values)."""
        return out

    def prediction_rows(self, names: list[str], out: torch.Tensor, classes: Optional[list[str]],
                        topk: int) -> list[dict]:
        """One row per input of predict's report (dtrain.predict)."""
        return [{"input": n, "prediction": row.tolist()} for n, row in zip(names, out)]


class ClassScores(Task):
    """A task whose outputs score classes along dimension 1 (classification, segmentation): a model is offered
    `num_classes`, a checkpoint records the class names (the indices where none are given), a prediction is
    the softmax over the classes."""

    def offers(self, outputs: int) -> dict[str, Any]:
        return {"num_classes": outputs}

    def class_names(self, names: Optional[list[str]], outputs: int) -> Optional[list[str]]:
        return names or [str(i) for i in range(outputs)]

    def predict(self, out: torch.Tensor) -> torch.Tensor:
        return out.softmax(1)


class EpochSums:
    """A rank's running [loss sum, units, *extras] for an epoch, kept without host syncs and with few
    device ops per step. Each batch's mean loss is held as it comes; its outputs and targets too, while
    they are small, so the extras (accuracy: argmax, compare, count) are computed for many batches at
    once rather than three small ops per step, which on a small model cost as much as a layer. All is
    folded into the float64 totals when the held outputs reach `hold_bytes`, and when read (at the
    epoch's end, or for a checkpoint)."""

    def __init__(self, task: Task, device: torch.device, hold_bytes: int = 1 << 20):
        self.task, self.total, self.hold_bytes = task, task.zeros(device), hold_bytes
        self.losses: list[torch.Tensor] = []  # each batch's mean loss
        self.counts: list[int | torch.Tensor] = []  # and its units
        self.samples = 0  # samples added since the last fold
        self.outputs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (outputs, targets) not yet in the extras
        self.extras: list[torch.Tensor] = []  # extra sums of folded outputs, [len(task.extras)] each
        self.held = 0  # bytes of self.outputs

    def add(self, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> None:
        self.losses.append(loss.detach())
        self.counts.append(self.task.units(y))
        self.samples += y.shape[0]
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
            device = self.total.device
            n = torch.tensor(self.counts, dtype=torch.float64, device=device) \
                if all(isinstance(c, int) for c in self.counts) else \
                torch.stack([torch.as_tensor(c, dtype=torch.float64, device=device) for c in self.counts])
            self.total[:3] += torch.stack([(torch.stack(self.losses).double() * n).sum(), n.sum(),
                                           torch.tensor(float(self.samples), dtype=torch.float64, device=device)])
            self.losses.clear()
            self.counts.clear()
            self.samples = 0
        if self.extras:
            self.total[3:] += torch.stack(self.extras).sum(0)
            self.extras.clear()
        return self.total

    def reduce(self, group: Any = None) -> dict[str, float]:
        """The epoch's means over every data-parallel rank (one all-reduce)."""
        return self.task.reduce(self.value(), group)

    def reset(self, total: torch.Tensor | None = None) -> None:
        self.losses.clear()
        self.counts.clear()
        self.samples = 0
        self.outputs.clear()
        self.extras.clear()
        self.held = 0
        self.total.copy_(total) if total is not None else self.total.zero_()  # copy_ moves it to the device


class NamedSums:
    """A rank's running sums of named batch means (what a model's own training_step or validation_step returns),
    each weighted by the batch's sample count, on the device: the names are fixed by the first batch. Reduced
    over the data-parallel ranks, each becomes the mean over every sample."""

    def __init__(self, device: torch.device):
        self.device, self.names = device, None
        self.total: Optional[torch.Tensor] = None  # [value * samples for each name..., samples]

    def add(self, values: dict[str, torch.Tensor], samples: int) -> None:
        if self.names is None:
            self.names = list(values)
        n = torch.tensor(float(samples), dtype=torch.float64, device=self.device)
        batch = torch.stack([*(values[k].detach().double().reshape(()) * n for k in self.names), n])
        self.total = batch if self.total is None else self.total + batch

    def value(self) -> torch.Tensor:
        width = len(self.names) + 1 if self.names is not None else 1
        return self.total if self.total is not None else torch.zeros(width, dtype=torch.float64, device=self.device)

    def reduce(self, group: Any = None) -> dict[str, float]:
        values = w.all_reduce_sum(self.value().clone(), group).tolist()
        n = max(values[-1], 1)
        return {**{name: v / n for name, v in zip(self.names or [], values)}, "samples": int(values[-1]),
                "units": values[-1]}

    def reset(self, total: torch.Tensor | None = None) -> None:
        self.total = None if total is None else total.to(self.device).clone()
