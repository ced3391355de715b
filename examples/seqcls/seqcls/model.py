"""The model: a GRU over the sequence, a linear head on its last state."""

import torch
from torch import nn


class GRUClassifier(nn.Module):
    """`input_shape` (length, channels) and `num_classes` come from the data (dtrain passes them); the
    sizes of the network come from the config."""

    def __init__(self, input_shape, num_classes: int, hidden: int = 32, layers: int = 1):
        super().__init__()
        self.gru = nn.GRU(input_shape[-1], hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)
        return self.head(out[:, -1])
