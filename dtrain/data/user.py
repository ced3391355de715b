"""A user's data set as dtrain's `Splits`: what the data factory returned (a map-style Dataset, or a dict of
splits {"train", "val", "test"}) plus what the model and the task need to know, read off the data.

- Items are `(input, target)` pairs. The task is `data.task` if given, else the data set's own `task`
  attribute (a registered task's name), else it follows the targets' dtype: integers are class labels
  (classification), floats are values (regression).
- Classes: the data set's `classes` (names) or `num_classes` attribute, else its `targets`, else one pass
  over the training targets (give your Dataset `classes` or `num_classes` to spare it).
- A data set without "val" has its validation split carved out as dtrain's own are (data.val_fraction,
  data.split_seed). A `torch.utils.data.TensorDataset` of (inputs, targets) is held as dtrain's `Tensors`
  and takes the device path; any other streams through a DataLoader.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch.utils.data import Dataset, IterableDataset, Subset, TensorDataset

from dtrain import batches, tasks
from dtrain.config import DataConfig
from dtrain.data.core import Splits, Tensors, split_indices
from dtrain.errors import ConfigError

SPLITS = ("train", "val", "test")


def as_splits(made: Any, cfg: DataConfig) -> Splits:
    """What the data factory returned, as Splits (a Splits is taken as it is)."""
    if isinstance(made, Splits):
        return made
    if isinstance(made, Mapping):
        unknown = sorted(set(made) - set(SPLITS))
        if unknown or "train" not in made:
            raise ConfigError(f"data: {cfg.factory} returned a dict with keys {sorted(made)}; expected 'train' and "
                              "optionally 'val' and 'test'")
        train, val, test = (_dataset(cfg, made.get(k), k) for k in SPLITS)
    else:
        train, val, test = _dataset(cfg, made, "train"), None, None
    if val is None and not is_stream(train):  # a stream cannot be carved: without a "val" it is not validated
        tr, va = split_indices(len(train), cfg)
        train, val = _subset(train, tr), _subset(train, va)
    x, y = _first_item(cfg, train)
    source = made["train"] if isinstance(made, Mapping) else made
    own = getattr(source, "task", None)  # the data set's own task attribute, if data.task does not say
    if cfg.task is not None or not isinstance(own, str):
        task = tasks.get(cfg.task if cfg.task is not None else tasks.of_targets(y))
    else:
        task = tasks.get(own, f"data: {cfg.factory}'s attribute task")
    problem = task.target_problem(y)
    if problem:
        raise ConfigError(f"data: {cfg.factory}: {problem}")
    try:
        classes, out = task.outputs(source, train, y)
    except TypeError:  # a stream cannot be indexed or counted through
        if not is_stream(train):
            raise
        raise ConfigError(f"data: {cfg.factory} is a stream, which dtrain cannot read through to count its classes; "
                          "give it a `num_classes` (or `classes`, `vocab_size`) attribute") from None
    return Splits(train, val, test, task.name, tuple(x.shape) if x is not None else (), out, classes,
                  input_dtype=str(x.dtype).removeprefix("torch.") if x is not None else None)


def is_stream(ds: Any) -> bool:
    return isinstance(ds, IterableDataset)


def _dataset(cfg: DataConfig, ds: Any, split: str) -> Optional[Dataset]:
    if ds is None and split != "train":
        return None
    if is_stream(ds):  # read through StatefulDataLoader, each rank and worker its own share (data.loaders)
        return ds
    if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
        raise ConfigError(f"data: {cfg.factory} returned a {type(ds).__name__} for '{split}'; expected a torch "
                          "Dataset: map-style (__getitem__ and __len__: dtrain shards it by index, like "
                          "DistributedSampler) or an IterableDataset (a stream), or a dict of them")
    if len(ds) == 0:
        raise ConfigError(f"data: the '{split}' split of {cfg.factory} is empty")
    if isinstance(ds, TensorDataset) and len(ds.tensors) == 2:  # held in memory: the device path
        return Tensors(*ds.tensors)
    return ds


def _subset(ds: Dataset, index: torch.Tensor) -> Dataset:
    return ds.take(index) if isinstance(ds, Tensors) else Subset(ds, index.tolist())


def _first_item(cfg: DataConfig, ds: Dataset) -> tuple[Optional[torch.Tensor], Any]:
    """The first item's input (its first tensor, for a structured input: a dict or a tuple of tensors) and
    target. An item that is not an (input, target) pair has no target: a model with its own training_step
    takes it as it is (the `free` task)."""
    item = next(iter(ds), None) if is_stream(ds) else ds[0]
    if item is None:
        raise ConfigError(f"data: the stream {cfg.factory} yields nothing")
    pair = isinstance(item, (tuple, list)) and len(item) == 2
    x, y = (item[0], item[1]) if pair else (item, None)
    if any(type(v).__module__.startswith("PIL.") for v in (x, y)):
        raise ConfigError(f"data: an item of {cfg.factory} holds a PIL image; give the data set a transform that "
                          "makes it a tensor (torchvision.transforms.PILToTensor(), or ToTensor() for floats in 0..1)")
    first = batches.first_tensor(x)
    if first is None and not isinstance(x, (dict, list, tuple)):
        first = torch.as_tensor(x)
    return first, y
