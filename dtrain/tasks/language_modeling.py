"""Language modelling: the next token at every position. Outputs [N, T, V] of scores over the vocabulary,
integer targets [N, T], positions labelled `ignore_index` (-100) count for nothing. A token is the unit of the
loss (per token) and of the token accuracy `acc`; `perplexity` is exp of the mean token loss; throughput is
also reported in tokens per second. The vocabulary is the data set's `num_classes`, `classes` or
`vocab_size`, offered to the model as `num_classes` and `vocab_size`."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F

from dtrain.errors import ConfigError, DataError
from dtrain.tasks.base import Task
from dtrain.tasks.classification import is_integer

IGNORE = -100


class LanguageModeling(Task):
    name = "language_modeling"
    extras = ("acc",)
    derived_names = ("perplexity",)
    monitor = "val_perplexity"
    unit = "token"

    def loss(self, out: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0,
             reduction: str = "mean") -> torch.Tensor:
        try:
            return F.cross_entropy(out.flatten(0, -2), y.flatten(), ignore_index=IGNORE,
                                   label_smoothing=label_smoothing, reduction=reduction)
        except IndexError as e:
            raise DataError(f"a token is out of range for the model's vocabulary of {out.shape[-1]} ({e}); tokens "
                            f"must be 0..{out.shape[-1] - 1} or {IGNORE} (ignored)") from None

    def extra_sums(self, out: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        return [((out.argmax(-1) == y) & (y != IGNORE)).sum()]

    def units(self, y: torch.Tensor) -> torch.Tensor:
        return (y != IGNORE).sum()

    def derived(self, means: dict[str, float]) -> dict[str, float]:
        return {"perplexity": math.exp(min(means["loss"], 700.0))}

    def check(self, out: torch.Tensor, y: torch.Tensor, classes: int) -> Optional[str]:
        if out.ndim != 3 or out.shape[:2] != y.shape or out.shape[2] != classes:
            return (f"the model's outputs have shape {list(out.shape)} and the targets {list(y.shape)}: language "
                    f"modelling needs outputs [N, T, {classes}] (the vocabulary) for targets [N, T]")
        if y.is_floating_point():
            return f"the targets are {y.dtype}: language modelling needs integer token ids"
        return None

    def target_problem(self, y: Any) -> Optional[str]:
        t = torch.as_tensor(y)
        if not is_integer(y) or t.ndim != 1:
            return (f"data.task=language_modeling but a target is {t.dtype} of shape {list(t.shape)}: it needs the "
                    "next token ids of a sequence, [T] integers")
        return None

    def outputs(self, source: Any, train: Any, y: Any) -> tuple[Optional[list[str]], int]:
        names = getattr(source, "classes", None)
        if names is not None:
            return [str(n) for n in names], len(names)
        for attr in ("num_classes", "vocab_size"):
            if getattr(source, attr, None):
                return None, int(getattr(source, attr))
        tokens = torch.cat([torch.as_tensor(train[i][1]).flatten() for i in range(len(train))])
        tokens = tokens[tokens != IGNORE]
        if tokens.numel() == 0 or tokens.min() < 0:
            raise ConfigError("data: the token ids must be integers 0..V-1 (or -100, ignored); give the data set "
                              "vocab_size")
        return None, int(tokens.max()) + 1

    def offers(self, outputs: int) -> dict[str, Any]:
        return {"num_classes": outputs, "vocab_size": outputs}

    def class_names(self, names: Optional[list[str]], outputs: int) -> Optional[list[str]]:
        return names

    def predict(self, out: torch.Tensor) -> torch.Tensor:
        return out.softmax(-1)

    def prediction_rows(self, names: list[str], out: torch.Tensor, classes: Optional[list[str]],
                        topk: int) -> list[dict]:
        """The most likely next tokens after each input sequence."""
        last = out[:, -1]
        k = max(1, min(topk, last.shape[1]))
        probs, top = last.topk(k, dim=1)
        label = (lambda t: classes[t]) if classes else str
        return [{"input": n, "top": [(label(t), float(p)) for t, p in zip(ts.tolist(), ps.tolist())]}
                for n, ts, ps in zip(names, top, probs)]
