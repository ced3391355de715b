"""Segmentation: a class per pixel. Outputs [N, C, *spatial] of class scores, integer targets [N, *spatial],
pixels labelled `ignore_index` (-100) count for nothing. A pixel is the unit of the loss and of the pixel
accuracy `acc`; an image is the unit of throughput. Evaluation adds the mean intersection-over-union `miou`
over the classes present (in the targets or the predictions) and each class's IoU (`per_class_iou`)."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F

from dtrain import world as w
from dtrain.errors import ConfigError, DataError
from dtrain.tasks.base import ClassScores, Evaluator
from dtrain.tasks.classification import is_integer

IGNORE = -100


class Segmentation(ClassScores):
    name = "segmentation"
    extras = ("acc",)
    evaluated = ("miou",)
    monitor = "val_miou"
    unit = "pixel"

    def loss(self, out: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0,
             reduction: str = "mean") -> torch.Tensor:
        try:
            return F.cross_entropy(out, y, ignore_index=IGNORE, label_smoothing=label_smoothing, reduction=reduction)
        except IndexError as e:
            raise DataError(f"a pixel's class is out of range for the model's {out.shape[1]} outputs ({e}); labels "
                            f"must be 0..{out.shape[1] - 1} or {IGNORE} (ignored)") from None

    def extra_sums(self, out: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        return [((out.argmax(1) == y) & (y != IGNORE)).sum()]

    def units(self, y: torch.Tensor) -> torch.Tensor:
        return (y != IGNORE).sum()

    def check(self, out: torch.Tensor, y: torch.Tensor, classes: int) -> Optional[str]:
        if out.ndim < 3 or out.shape[1] != classes or out.shape[:1] + out.shape[2:] != y.shape:
            return (f"the model's outputs have shape {list(out.shape)} and the targets {list(y.shape)}: segmentation "
                    f"needs outputs [N, {classes}, *spatial] for targets [N, *spatial]")
        if y.is_floating_point():
            return f"the targets are {y.dtype}: segmentation needs integer class labels per pixel"
        valid = y[y != IGNORE]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= classes):  # the first batch only
            return f"a pixel's class is outside 0..{classes - 1} (and not {IGNORE}, ignored)"
        return None

    def evaluator(self, classes: int, device: torch.device, group: Any = None) -> Evaluator:
        return IoU(classes, device, group)

    def target_problem(self, y: Any) -> Optional[str]:
        t = torch.as_tensor(y)
        if not is_integer(y) or t.ndim < 1:
            return (f"data.task=segmentation but a target is {t.dtype} of shape {list(t.shape)}: segmentation needs "
                    "an integer class per pixel")
        return None

    def outputs(self, source: Any, train: Any, y: Any) -> tuple[Optional[list[str]], int]:
        names = getattr(source, "classes", None)
        if names is not None:
            return [str(n) for n in names], len(names)
        if getattr(source, "num_classes", None):
            return None, int(source.num_classes)
        labels = torch.cat([torch.as_tensor(train[i][1]).flatten() for i in range(len(train))])
        labels = labels[labels != IGNORE]
        if labels.numel() == 0 or labels.min() < 0:
            raise ConfigError("data: the pixels' classes must be integers 0..C-1 (or -100, ignored)")
        return None, int(labels.max()) + 1

    def prediction_rows(self, names: list[str], out: torch.Tensor, classes: Optional[list[str]],
                        topk: int) -> list[dict]:
        """Each input's predicted mask, as the share of its pixels in each class."""
        labels = classes or [str(i) for i in range(out.shape[1])]
        masks = out.argmax(1).flatten(1)
        return [{"input": n, "pixels": {labels[c]: float((m == c).float().mean()) for c in range(len(labels))}}
                for n, m in zip(names, masks)]


class IoU(Evaluator):
    """Intersection over union per class from the pixels' confusion (summed over ranks): the mean over the
    classes present in the targets or the predictions, and each class's (NaN for a class in neither)."""
    names = ("miou",)

    def __init__(self, classes: int, device: torch.device, group: Any = None):
        self.classes, self.group = classes, group
        self.matrix = torch.zeros(classes * classes, dtype=torch.int64, device=device)

    def update(self, out: torch.Tensor, y: torch.Tensor) -> None:
        valid = y != IGNORE
        self.matrix += torch.bincount(y[valid] * self.classes + out.argmax(1)[valid],
                                      minlength=self.classes * self.classes)

    def compute(self) -> dict[str, Any]:
        c = w.all_reduce_sum(self.matrix, self.group).view(self.classes, self.classes).double()
        tp = c.diag()
        union = c.sum(0) + c.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))
        present = union > 0
        return {"miou": float(iou[present].mean()) if present.any() else math.nan, "per_class_iou": iou.tolist()}
