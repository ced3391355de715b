"""One process: the model as it is (the base class's behaviour, named)."""

from dtrain.strategy.base import Strategy


class Single(Strategy):
    name = "single"
