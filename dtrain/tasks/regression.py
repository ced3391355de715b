"""Regression: one or more real values per sample, outputs shaped like the targets; trained and reported by
the mean squared error."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from dtrain.tasks.base import Task


class Regression(Task):
    name = "regression"
    monitor = "val_loss"

    def loss(self, out: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0,
             reduction: str = "mean") -> torch.Tensor:
        return F.mse_loss(out, _as_output(y, out), reduction=reduction)

    def check(self, out: torch.Tensor, y: torch.Tensor, classes: int) -> Optional[str]:
        if out.shape[:1] != y.shape[:1] or out.numel() != y.numel():
            return (f"the model's outputs have shape {list(out.shape)} but the targets {list(y.shape)}: a "
                    "regression model returns one value per target")
        return None

    def outputs(self, source: Any, train: Any, y: Any) -> tuple[Optional[list[str]], int]:
        return None, max(1, torch.as_tensor(y).numel())

    def table_targets(self, path: Path, header: list[str], rows: list[list[str]], column: str):
        from dtrain.data.tables import table_columns
        return table_columns(path, header, rows, [column]), 1, None


def _as_output(y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Regression targets shaped like the outputs: a data set's scalar targets [N] against outputs [N, 1]."""
    return y.reshape(out.shape).to(out.dtype) if y.numel() == out.numel() else y
