"""The sharding benchmark's model: a wide MLP (784 -> 4096 x 4 -> 10: 53.6 M parameters), a user's model
named by `_target_` as any other (benchmarks/ on PYTHONPATH)."""

import math

from torch import nn


def wide_mlp(input_shape, num_outputs: int, width: int = 4096, depth: int = 4) -> nn.Module:
    sizes = [math.prod(input_shape), *[width] * depth, num_outputs]
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])
