"""A strategy and a task of a user's own, each one class in this one file, registered without editing dtrain:
what tests/test_seams.py trains with."""

import collections

import torch.nn.functional as F

from dtrain import strategy, tasks
from dtrain.strategy import Strategy
from dtrain.tasks import Task


class Counting(Strategy):
    """Wraps nothing and counts what the loop asks of it: a strategy is one class and one registry entry."""
    name = "counting"
    describe = "the counting test strategy"
    calls: collections.Counter = collections.Counter()

    def wrap(self, model):
        Counting.calls["wrap"] += 1
        return model

    def autocast(self):
        Counting.calls["autocast"] += 1
        return super().autocast()

    def no_sync(self, net, sync):
        Counting.calls["no_sync" if not sync else "sync"] += 1
        return super().no_sync(net, sync)

    def clip_grad_norm(self, parameters, max_norm):
        Counting.calls["clip"] += 1
        return super().clip_grad_norm(parameters, max_norm)


strategy.register(Counting)


# -- a task of one's own: binary classification with one logit per sample ------------------------------------

class Binary(Task):
    """One logit per sample, targets 0 or 1; trained with binary cross-entropy, reports accuracy."""
    name = "binary"
    extras = ("acc",)
    monitor = "val_acc"

    def loss(self, out, y, label_smoothing=0.0, reduction="mean"):
        return F.binary_cross_entropy_with_logits(out.squeeze(1), y.float(), reduction=reduction)

    def extra_sums(self, out, y):
        return [((out.squeeze(1) > 0).long() == y).sum()]

    def check(self, out, y, classes):
        return None if out.ndim == 2 and out.shape[1] == 1 else f"a binary model returns [N, 1], not {list(out.shape)}"

    def outputs(self, source, train, y):
        return None, 1


tasks.register(Binary())
