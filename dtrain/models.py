"""The workloads, registered by name. Each builder takes the input shape and output size of the data."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from dtrain.errors import ConfigError


def mlp(shape: tuple[int, ...], out: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), 128), nn.ReLU(), nn.Linear(128, out))


def mlp3(shape: tuple[int, ...], out: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), 128), nn.ReLU(),
                         nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, out))


def _flat_size(features: nn.Module, shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        return features(torch.zeros(1, *shape)).numel()


def lenet(shape: tuple[int, ...], out: int) -> nn.Module:
    features = nn.Sequential(
        nn.Conv2d(shape[0], 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
    )
    return nn.Sequential(features, nn.Linear(_flat_size(features, shape), 120), nn.ReLU(),
                         nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, out))


def convnet(shape: tuple[int, ...], out: int) -> nn.Module:
    features = nn.Sequential(
        nn.Conv2d(shape[0], 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
    )
    return nn.Sequential(features, nn.Linear(_flat_size(features, shape), 256), nn.ReLU(),
                         nn.Linear(256, out))


def resnet18(shape: tuple[int, ...], out: int) -> nn.Module:
    from torchvision.models import resnet18 as tv_resnet18  # imported here: torchvision is slow to import
    net = tv_resnet18(num_classes=out)
    # Small-image stem (CIFAR-style): a 3x3 stride-1 conv and no max-pool keep 32x32 inputs informative.
    net.conv1 = nn.Conv2d(shape[0], 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def linear(shape: tuple[int, ...], out: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), out))


# name -> (builder, task it solves, input rank it needs: None = any, 3 = C x H x W images)
MODELS: dict[str, tuple[Callable[[tuple[int, ...], int], nn.Module], str, int | None]] = {
    "mlp": (mlp, "classification", None),
    "mlp3": (mlp3, "classification", None),
    "lenet": (lenet, "classification", 3),
    "convnet": (convnet, "classification", 3),
    "resnet18": (resnet18, "classification", 3),
    "linear": (linear, "regression", None),
}


def build(name: str, task: str, shape: tuple[int, ...], out: int, data_name: str) -> nn.Module:
    """The model `name` for data of `shape` with `out` outputs; ConfigError if they cannot pair."""
    builder, model_task, rank = MODELS[name]
    pairs = sorted(n for n, (_, t, _) in MODELS.items() if t == task)
    if model_task != task:
        raise ConfigError(f"model={name} solves {model_task} but data={data_name} is a {task} task; "
                          f"use one of model={', '.join(pairs)}")
    if rank is not None and len(shape) != rank:
        raise ConfigError(f"model={name} needs C x H x W images but data={data_name} gives shape "
                          f"{list(shape)}; use model=mlp or data with images")
    try:
        return builder(tuple(shape), out)
    except RuntimeError as e:  # e.g. images too small for LeNet's two 5x5 convolutions
        raise ConfigError(f"model={name} cannot take data={data_name} of shape {list(shape)}: "
                          f"{str(e).splitlines()[0]}") from e
