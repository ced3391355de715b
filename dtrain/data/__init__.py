"""Data sets, registered by name, and the rank-aware loaders (a package: core, images, tables, loaders).

Every builder returns `Splits`: train/val(/test) datasets yielding (input, target) plus what the model
needs to know (task, input shape, output size). Data sets that fit in memory are `Tensors` (images as
uint8) and train from the device (`DeviceLoader`); files on disk (imagefolder) stream through a
DataLoader (`StreamLoader`). Both give a rank the same samples per epoch (`epoch_order`).
"""

from __future__ import annotations

from dtrain import plugins
from dtrain import world as w
from dtrain.config import BUILTIN_DATA, DATA_OFFERS, DataConfig
from dtrain.data.core import Splits, Tensors, ToFloat, split_indices, tensor_splits
from dtrain.data.images import SAMPLE_DIR, cifar10, imagefolder, mnist, mnist_sample, read_idx, read_idx_pair, read_rgb
from dtrain.data.loaders import (DeviceLoader, Loaders, ShardSampler, StreamLoader, TrainSampler, collate_of,
                                 epoch_order, eval_loader, loaders, on_device, train_loader)
from dtrain.data.tables import csv_table, read_table, regression, regression_truth, synthetic, table_columns
from dtrain.data.text import text
from dtrain.data import streams
from dtrain.data.user import as_splits, is_stream

# dtrain's own data sets, registered the way a user's are: conf/data/NAME.yaml names the `_target_`.
BUILTIN = BUILTIN_DATA


def build(cfg: DataConfig, world: w.World, made: object = None) -> Splits:
    """The data set `cfg` names (its `_target_` and keyword arguments; dtrain offers `options` = cfg and
    `world` to a factory that takes them), or `made` (from dtrain.fit), as Splits."""
    if made is None:
        made = plugins.instantiate("data", plugins.Target(cfg.factory, cfg.kwargs),
                                   dict(zip(DATA_OFFERS, (cfg, world))))
    return as_splits(made, cfg)


__all__ = ["Splits", "Tensors", "ToFloat", "split_indices", "tensor_splits", "SAMPLE_DIR", "read_idx",
           "read_idx_pair", "read_rgb", "mnist_sample", "mnist", "cifar10", "imagefolder", "synthetic", "regression",
           "regression_truth", "csv_table", "text", "read_table", "table_columns", "epoch_order", "TrainSampler",
           "StreamLoader", "DeviceLoader", "ShardSampler", "Loaders", "on_device", "train_loader", "eval_loader",
           "loaders", "BUILTIN", "build", "as_splits", "collate_of", "is_stream", "streams"]
