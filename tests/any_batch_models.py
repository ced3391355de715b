"""Models of a user's own with their own steps, importable by `_target_` (tests/test_any_batch.py)."""

import math

import torch.nn.functional as F
from torch import nn


class OwnStepNet(nn.Module):
    """An MLP whose training_step computes its own loss and reports a margin; its validation_step reports both."""

    def __init__(self, input_shape, num_classes: int):
        super().__init__()
        self.fc1 = nn.Linear(math.prod(input_shape), 16)
        self.fc2 = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x.flatten(1))))

    def margin(self, logits, y):
        top = logits.gather(1, y[:, None]).squeeze(1)
        return (top - logits.logsumexp(1)).mean()

    def training_step(self, batch):
        x, y = batch
        logits = self(x)
        return {"loss": F.cross_entropy(logits, y), "margin": self.margin(logits, y)}

    def validation_step(self, batch):
        x, y = batch
        logits = self(x)
        return {"loss": F.cross_entropy(logits, y), "margin": self.margin(logits, y)}
