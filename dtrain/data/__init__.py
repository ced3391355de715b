"""Data sets, registered by name, and the rank-aware loaders (a package: core, images, tables, loaders).

Every builder returns `Splits`: train/val(/test) datasets yielding (input, target) plus what the model
needs to know (task, input shape, output size). Data sets that fit in memory are `Tensors` (images as
uint8) and train from the device (`DeviceLoader`); files on disk (imagefolder) stream through a
DataLoader (`StreamLoader`). Both give a rank the same samples per epoch (`epoch_order`).
"""

from __future__ import annotations

from typing import Callable

from dtrain import world as w
from dtrain.config import DataConfig
from dtrain.data.core import Splits, Tensors, ToFloat, split_indices, tensor_splits
from dtrain.data.images import SAMPLE_DIR, cifar10, imagefolder, mnist, mnist_sample, read_idx, read_idx_pair, read_rgb
from dtrain.data.loaders import (DeviceLoader, Loaders, ShardSampler, StreamLoader, TrainSampler, epoch_order,
                                 eval_loader, loaders, on_device, train_loader)
from dtrain.data.tables import csv_table, read_table, regression, regression_truth, synthetic, table_columns

DATASETS: dict[str, Callable[[DataConfig, w.World], Splits]] = {
    "mnist_sample": mnist_sample,
    "mnist": mnist,
    "cifar10": cifar10,
    "imagefolder": imagefolder,
    "synthetic": synthetic,
    "regression": regression,
    "csv": csv_table,
}


def build(cfg: DataConfig, world: w.World) -> Splits:
    return DATASETS[cfg.name](cfg, world)


__all__ = ["Splits", "Tensors", "ToFloat", "split_indices", "tensor_splits", "SAMPLE_DIR", "read_idx",
           "read_idx_pair", "read_rgb", "mnist_sample", "mnist", "cifar10", "imagefolder", "synthetic", "regression",
           "regression_truth", "csv_table", "read_table", "table_columns", "epoch_order", "TrainSampler",
           "StreamLoader", "DeviceLoader", "ShardSampler", "Loaders", "on_device", "train_loader", "eval_loader",
           "loaders", "DATASETS", "build"]
