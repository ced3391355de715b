"""A two-level U-Net: outputs [N, classes, H, W], one score per class and pixel."""

import torch
import torch.nn.functional as F
from torch import nn


def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class TinyUNet(nn.Module):
    def __init__(self, input_shape, num_classes: int, width: int = 8):
        super().__init__()
        self.down = block(input_shape[0], width)
        self.bottom = block(width, 2 * width)
        self.up = block(3 * width, width)
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x):
        skip = self.down(x)
        deep = self.bottom(F.max_pool2d(skip, 2))
        up = F.interpolate(deep, size=skip.shape[-2:], mode="nearest")
        return self.head(self.up(torch.cat([skip, up], dim=1)))
