"""The rank-aware loaders: DistributedSampler's order (`epoch_order`) on two paths. Data sets held in memory
live on the device (`DeviceLoader`: index slices, batched augmentation); others stream through a DataLoader
with worker processes (`StreamLoader`). Both give a rank the same samples per epoch, from any position."""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, Subset

from dtrain import plugins, signals
from dtrain import world as w
from dtrain.config import Config, DataConfig, DataPath
from dtrain.data import streams
from dtrain.data.core import Splits, Tensors
from dtrain.data.streams import _init_worker
from dtrain.errors import ConfigError, DataError

# -- samplers and loaders ---------------------------------------------------------------------------

def epoch_order(n: int, world: w.World, seed: int, epoch: int, shuffle: bool, drop_last: bool) -> torch.Tensor:
    """This rank's sample indices for an epoch, by DistributedSampler's rules: one permutation from
    `seed + epoch` that every rank draws alike, trimmed (drop_last) or padded by repeating its start to a
    multiple of the world size, then every world_size-th index from this rank's position."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)) if shuffle else torch.arange(n)
    ranks = world.world_size
    per_rank = math.ceil((n - ranks) / ranks) if drop_last and n % ranks else math.ceil(n / ranks)
    total = per_rank * ranks
    if total > n:
        order = torch.cat([order, order.repeat(math.ceil((total - n) / n))[:total - n]])
    return order[world.rank:total:ranks]


class TrainSampler(Sampler[int]):
    """The DataLoader path's order (`epoch_order`), able to start part-way into an epoch (exact mid-epoch
    resume). With the global batch B split into B/world per rank, global batch i is the same set of
    samples whatever the world size, so a saved position is re-sharded correctly on any world size."""

    def __init__(self, n: int, world: w.World, shuffle: bool, seed: int, drop_last: bool):
        self.n, self.world, self.shuffle, self.seed, self.drop_last = n, world, shuffle, seed, drop_last
        self.epoch, self.skip = 0, 0  # skip: samples of this rank's shard to skip, this epoch only

    def set_position(self, epoch: int, global_samples_done: int) -> None:
        self.epoch, self.skip = epoch, global_samples_done // self.world.world_size

    def order(self) -> torch.Tensor:
        return epoch_order(self.n, self.world, self.seed, self.epoch, self.shuffle, self.drop_last)[self.skip:]

    def __iter__(self):
        order, self.skip = self.order(), 0
        return iter(order.tolist())

    def __len__(self) -> int:
        return len(self.order())


class StreamLoader(DataLoader):
    """The DataLoader path, for data that does not live on the device (imagefolder): worker processes,
    pinned memory and prefetching from data.* keys; `set_position` as DeviceLoader has it. Its workers
    ignore the stop signals a cluster sends to the whole process group (see dtrain.signals)."""

    def __init__(self, *args, worker_init_fn: Optional[Callable[[int], None]] = None, **kwargs):
        super().__init__(*args, worker_init_fn=functools.partial(_init_worker, worker_init_fn), **kwargs)

    def set_position(self, epoch: int, global_samples_done: int) -> None:
        self.sampler.set_position(epoch, global_samples_done)

    def __iter__(self):
        with signals.blocked_in_children():  # workers (if any) are started here
            batches = super().__iter__()
        self.last_iterator = weakref.ref(batches)  # for shut_down_workers
        return _worker_errors_in_one_line(batches)


def shut_down_workers(loader: Any) -> None:
    """End a DataLoader's worker processes now: its persistent iterator's and the last one it handed out
    (a run that raised keeps it alive in the traceback). Left to garbage collection, which frees a cycle's
    objects in any order, the iterator's queues may be closed before it asks its workers to stop, and each
    worker then waits out PyTorch's 5 s poll before it exits: 10 s more per loader with 2 workers."""
    last = getattr(loader, "last_iterator", None)
    for batches in (getattr(loader, "_iterator", None), last() if last is not None else None):
        if hasattr(batches, "_shutdown_workers"):  # PyTorch's (and torchdata's) multiprocessing iterators
            batches._shutdown_workers()


def _worker_errors_in_one_line(batches):
    """A DataError raised in a worker arrives wrapped in the worker's traceback; keep its own line. Items
    that torch's default collate cannot stack (variable lengths) are one line naming data.collate."""
    try:
        yield from batches
    except DataError as e:
        raise DataError(str(e).rstrip().splitlines()[-1].split("DataError: ", 1)[-1]) from None
    except RuntimeError as e:
        if "stack expects each tensor to be equal size" not in str(e):
            raise
        why = next(line for line in str(e).splitlines() if "stack expects" in line).strip()
        raise DataError(f"the items of a batch do not stack into one tensor ({why}): give a collate function "
                        "that pads them, data.collate: {_target_: your.module.pad} (or dtrain.fit(..., "
                        "collate=pad))") from None


class DeviceLoader:
    """The fast path for data that fits in memory: the data set lives on the device as tensors, each batch
    is an index slice of this rank's share of the epoch order (the same samples as the DataLoader path),
    with no worker, no collate and no host-to-device copy. Images are normalised once up front when nothing
    random happens per batch (Tensors.prepared), else kept as uint8 and augmented and normalised per batch;
    augmentation draws from a stream seeded by (seed, rank, epoch, batch), so a resumed epoch sees the same
    crops."""

    def __init__(self, data: Tensors, world: w.World, batch_size: int, *, train: bool, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False):
        self.dataset, self.world, self.batch_size = data.to(world.device).prepared(), world, batch_size
        self.train, self.seed, self.shuffle, self.drop_last = train, seed, shuffle, drop_last
        self.epoch, self.skip = 0, 0

    def set_position(self, epoch: int, global_samples_done: int) -> None:
        self.epoch, self.skip = epoch, global_samples_done // self.world.world_size

    def order(self) -> torch.Tensor:
        if not self.train:  # evaluation: rank r takes samples r, r + world, ..., each sample once
            return torch.arange(self.world.rank, len(self.dataset), self.world.world_size)
        return epoch_order(len(self.dataset), self.world, self.seed, self.epoch, self.shuffle,
                           self.drop_last)[self.skip:]

    def __len__(self) -> int:
        n = len(self.order())
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        order, first = self.order().to(self.world.device), self.skip // self.batch_size
        self.skip = 0
        generator = torch.Generator(self.world.device) if self.dataset.augment is not None and self.train else None
        for i in range(len(order) // self.batch_size if self.drop_last else math.ceil(len(order) / self.batch_size)):
            if generator is not None:
                generator.manual_seed(hash((self.seed, self.world.rank, self.epoch, first + i)) % 2**62)
            yield self.dataset.batch(order[i * self.batch_size:(i + 1) * self.batch_size], generator)


def on_device(ds: Dataset, cfg: DataConfig) -> bool:
    """Which path a data set takes: data.loader=auto puts in-memory data sets on the device."""
    if cfg.loader == DataPath.stream:
        return False
    if isinstance(ds, Tensors):
        return True
    if cfg.loader == DataPath.device:
        raise ConfigError(f"data.loader=device needs a data set held in memory, but data={cfg.name} streams from "
                          "files; use data.loader=auto or stream")
    return False


def train_loader(ds: Dataset, cfg: Config, world: w.World, shuffle: bool = True, collate: Optional[Callable] = None):
    per_rank = cfg.data.batch_size // world.world_size
    if isinstance(ds, IterableDataset):  # a stream: its own order, each rank and worker its share
        return streams.loader(ds, world, per_rank, _stream_options(cfg, world, collate), _worker_errors_in_one_line)
    sampler = TrainSampler(len(ds), world, shuffle, cfg.seed, cfg.data.drop_last)
    if len(sampler) < per_rank and cfg.data.drop_last:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is larger than the training split "
                          f"({len(ds)} samples): no full batch fits; lower it or set data.drop_last=false")
    if on_device(ds, cfg.data):
        return DeviceLoader(ds, world, per_rank, train=True, seed=cfg.seed, shuffle=shuffle,
                            drop_last=cfg.data.drop_last)
    return StreamLoader(ds, batch_size=per_rank, sampler=sampler, drop_last=cfg.data.drop_last,
                        generator=torch.Generator().manual_seed(cfg.seed + world.rank),
                        **_stream_options(cfg, world, collate))


def eval_loader(ds: Dataset, cfg: Config, world: w.World, collate: Optional[Callable] = None):
    per_rank = cfg.data.eval_batch_size // world.world_size
    if isinstance(ds, IterableDataset):
        return streams.loader(ds, world, per_rank, _stream_options(cfg, world, collate), _worker_errors_in_one_line)
    if on_device(ds, cfg.data):
        return DeviceLoader(ds, world, per_rank, train=False)
    return StreamLoader(ds, batch_size=per_rank, sampler=ShardSampler(len(ds), world),
                        **_stream_options(cfg, world, collate))


def collate_of(cfg: DataConfig, given: Optional[Callable] = None) -> Optional[Callable]:
    """dtrain.fit's collate function, or the one data.collate names (with its keyword arguments), or None."""
    if given is not None or cfg.collate is None:
        return given
    fn = plugins.resolve("data.collate", cfg.collate.path)
    return functools.partial(fn, **cfg.collate.kwargs) if cfg.collate.kwargs else fn


def _stream_options(cfg: Config, world: w.World, collate: Optional[Callable] = None) -> dict:
    d, workers = cfg.data, cfg.data.num_workers
    return {"num_workers": workers, **({"collate_fn": collate} if collate is not None else {}),
            "pin_memory": world.device.type == "cuda" if d.pin_memory is None else d.pin_memory,
            "persistent_workers": d.persistent_workers and workers > 0,
            "prefetch_factor": d.prefetch_factor if workers > 0 else None}


class ShardSampler(Sampler[int]):
    """Rank r takes samples r, r+world, ...: every sample exactly once, no padding (for evaluation)."""

    def __init__(self, n: int, world: w.World):
        self.indices = range(world.rank, n, world.world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class Loaders:
    train: DeviceLoader | StreamLoader
    val: Optional[DeviceLoader | StreamLoader]  # None: a stream without a "val" split is not validated
    test: Optional[DeviceLoader | StreamLoader]

    def close(self) -> None:
        """Their worker processes ended (at the end of a run, whether it finished or raised)."""
        for loader in (self.train, self.val, self.test):
            shut_down_workers(loader)


def loaders(splits: Splits, cfg: Config, world: w.World, collate: Optional[Callable] = None) -> Loaders:
    """The rank-aware loaders of a run. debug.overfit_batches trains and validates on the same few fixed
    batches (and has no test)."""
    train, val, test = splits.train, splits.val, splits.test
    if cfg.debug.overfit_batches:
        first = range(min(len(train), cfg.debug.overfit_batches * cfg.data.batch_size))
        train = val = train.take(first) if isinstance(train, Tensors) else Subset(train, first)
        test = None
    return Loaders(train_loader(train, cfg, world, shuffle=not cfg.debug.overfit_batches, collate=collate),
                   *(eval_loader(ds, cfg, world, collate) if ds is not None else None for ds in (val, test)))
