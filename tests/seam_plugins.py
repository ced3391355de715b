"""A strategy and a task of a user's own, each one class in this one file, registered without editing dtrain:
what tests/test_seams.py trains with."""

import collections

from dtrain import strategy
from dtrain.strategy import Strategy


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
