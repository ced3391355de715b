"""Classification: one class label per sample, integer targets 0..C-1, outputs [N, C] of class scores.
Training reports the loss (cross-entropy) and accuracy; evaluation adds the confusion matrix, macro F1 and
macro one-vs-rest AUC-ROC over every rank's samples."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dtrain import world as w
from dtrain.errors import ConfigError, DataError
from dtrain.tasks.base import ClassScores, Evaluator


class Classification(ClassScores):
    name = "classification"
    extras = ("acc",)
    evaluated = ("f1", "auc")
    monitor = "val_acc"
    classifies = True

    def loss(self, out: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0,
             reduction: str = "mean") -> torch.Tensor:
        try:
            return F.cross_entropy(out, y, label_smoothing=label_smoothing, reduction=reduction)
        except IndexError as e:  # a label past the outputs, in a batch after the first (on the CPU; CUDA asserts)
            raise DataError(f"a class label is out of range for the model's {out.shape[1]} outputs ({e}); labels "
                            f"must be 0..{out.shape[1] - 1}") from None

    def extra_sums(self, out: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        return [(out.argmax(1) == y).sum()]

    def check(self, out: torch.Tensor, y: torch.Tensor, classes: int) -> Optional[str]:
        if out.ndim != 2 or out.shape[1] != classes:
            return (f"the model's outputs have shape {list(out.shape)} but the data has {classes} classes: a "
                    f"classifier returns scores of shape [N, {classes}] (a model factory taking num_classes= is "
                    "given it)")
        if y.is_floating_point() or y.ndim != 1:
            return (f"the targets are {y.dtype} of shape {list(y.shape)}: classification needs integer class labels "
                    "of shape [N] (or data.task=regression)")
        lo, hi = int(y.min()), int(y.max())  # one host sync, on the first batch only
        if lo < 0 or hi >= classes:
            return f"a class label is {lo if lo < 0 else hi}, outside 0..{classes - 1} (the data has {classes} classes)"
        return None

    def evaluator(self, classes: int, device: torch.device, group: Any = None) -> Evaluator:
        return Confusion(classes, device, group)

    # -- the data ---------------------------------------------------------------------------------------------

    def target_problem(self, y: Any) -> Optional[str]:
        if not is_integer(y):
            return (f"data.task=classification but a target is {y!r}: classification needs integer class labels "
                    "0..C-1 (use data.task=regression for values)")
        return None

    def outputs(self, source: Any, train: Any, y: Any) -> tuple[Optional[list[str]], int]:
        """The data set's `classes` (names) or `num_classes`, else its `targets`, else one pass over the
        training targets."""
        names = getattr(source, "classes", None)
        if names is not None:
            return [str(n) for n in names], len(names)
        if getattr(source, "num_classes", None):
            return None, int(source.num_classes)
        targets = getattr(source, "targets", None)
        labels = torch.as_tensor(targets) if targets is not None else \
            torch.tensor([int(train[i][1]) for i in range(len(train))])
        if labels.numel() == 0 or labels.min() < 0:
            raise ConfigError("data: the class labels must be integers 0..C-1")
        return None, int(labels.max()) + 1

    def table_targets(self, path: Path, header: list[str], rows: list[list[str]], column: str):
        """Any text as class names, numbers in numeric order (2 before 10)."""
        from dtrain.data.tables import is_number
        labels = [row[header.index(column)].strip() for row in rows]
        classes = sorted(set(labels))
        if all(map(is_number, classes)):
            classes.sort(key=float)
        if len(classes) < 2:
            raise DataError(f"{path}: column {column!r} holds one class ({classes[0]!r}); classification "
                            "needs two or more")
        code = {c: i for i, c in enumerate(classes)}
        return torch.tensor([code[v] for v in labels]), len(classes), classes

    # -- a trained model ---------------------------------------------------------------------------------

    def prediction_rows(self, names: list[str], out: torch.Tensor, classes: Optional[list[str]],
                        topk: int) -> list[dict]:
        """The top-k classes of each input with their probabilities."""
        k = max(1, min(topk, out.shape[1]))
        probs, top = out.topk(k, dim=1)
        labels = classes or [str(i) for i in range(out.shape[1])]
        return [{"input": n, "top": [(labels[c], float(p)) for c, p in zip(cs.tolist(), ps.tolist())]}
                for n, cs, ps in zip(names, top, probs)]


def is_integer(y: Any) -> bool:
    """Whether a target is an integer (a Python int, an integer tensor or NumPy value)."""
    try:
        t = torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError):
        return False
    return not t.is_floating_point() and not t.is_complex()


class Confusion(Evaluator):
    """The confusion matrix (rows: true class, columns: predicted), summed over ranks, its macro F1, and the
    macro AUC-ROC of every rank's class probabilities gathered together (exact AUC needs all the scores; F1
    needs only the summed confusion matrix)."""
    names = ("f1", "auc")

    def __init__(self, classes: int, device: torch.device, group: Any = None):
        self.classes, self.device, self.group = classes, device, group
        self.matrix = torch.zeros(classes * classes, dtype=torch.int64, device=device)
        self.scores: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def update(self, out: torch.Tensor, y: torch.Tensor) -> None:
        self.matrix += torch.bincount(y * self.classes + out.argmax(1), minlength=self.classes * self.classes)
        self.scores.append(out.softmax(1))
        self.labels.append(y)

    def compute(self) -> dict[str, Any]:
        c = self.classes
        confusion = w.all_reduce_sum(self.matrix, self.group).view(c, c)
        scores = torch.cat(self.scores) if self.scores else torch.zeros(0, c, device=self.device)
        labels = torch.cat(self.labels) if self.labels else torch.zeros(0, dtype=torch.int64, device=self.device)
        return {"confusion": confusion.tolist(), "f1": macro_f1(confusion),
                "auc": macro_auc(w.all_gather_rows(scores, self.group), w.all_gather_rows(labels, self.group))}


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
