"""Streams: a data set that is a `torch.utils.data.IterableDataset`, read through torchdata's
StatefulDataLoader, whose state (each worker's position in the stream) is saved in every checkpoint, so a run
resumes exactly, workers included. Each data-parallel rank and each of its workers reads a disjoint share:
the stream's own `shard(index, count)` where it has one, else every count-th item. A stream with its own
`state_dict`/`load_state_dict` resumes from it; one without is fast-forwarded (its share read again up to
where it stopped), and the log says so. An epoch is one pass of the stream."""

from __future__ import annotations

import functools
import itertools
import weakref
from typing import Any, Callable, Iterator, Optional

from torch.utils.data import IterableDataset, get_worker_info

from dtrain import signals
from dtrain import world as w


class Share(IterableDataset):
    """A data-parallel rank's and a worker's share of a stream: share number rank * workers + worker of
    size * workers, by the stream's `shard(index, count)` or every count-th item."""

    def __init__(self, stream: IterableDataset, rank: int, size: int):
        self.stream, self.rank, self.size = stream, rank, size

    def place(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * workers + worker, self.size * workers

    def __iter__(self) -> Iterator[Any]:
        index, count = self.place()
        if callable(getattr(self.stream, "shard", None)):
            return iter(self.stream.shard(index, count))
        return itertools.islice(iter(self.stream), index, None, count)


class StatefulShard(Share):
    """The share of a stream that keeps its own state: that state, and how many of its items this share has
    read past (so every count-th item stays this share's after a resume)."""

    def __init__(self, stream: IterableDataset, rank: int, size: int):
        super().__init__(stream, rank, size)
        self.read = 0  # items of the stream read in this pass (this worker's copy of the stream)

    def __iter__(self) -> Iterator[Any]:
        index, count = self.place()
        if callable(getattr(self.stream, "shard", None)):
            yield from self.stream.shard(index, count)
            return
        for item in iter(self.stream):
            self.read += 1
            if (self.read - 1 - index) % count == 0:
                yield item
        self.read = 0

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict(), "read": self.read}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        self.read = state["read"]


def has_state(stream: Any) -> bool:
    return callable(getattr(stream, "state_dict", None)) and callable(getattr(stream, "load_state_dict", None))


def has_length(stream: Any) -> bool:
    try:
        len(stream)
    except TypeError:
        return False
    return True


def loader(stream: IterableDataset, dp: w.World, batch_size: int, options: dict, errors: Callable) -> "Any":
    """This rank's StatefulDataLoader of `stream` (its `dp` rank among the data-parallel ranks)."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    class Stream(StatefulDataLoader):
        """Its workers ignore the stop signals a cluster sends to the whole process group; a saved position is
        its own state (set_position only starts a pass)."""
        fast_forward = not has_state(stream)

        def set_position(self, epoch: int, global_samples_done: int) -> None:
            pass

        def __iter__(self):
            with signals.blocked_in_children():  # workers (if any) are started here
                batches = super().__iter__()
            self.last_iterator = weakref.ref(batches)  # for loaders.shut_down_workers
            return errors(batches)

    share = (StatefulShard if has_state(stream) else Share)(stream, dp.rank, dp.world_size)
    init = options.pop("worker_init_fn", None)
    return Stream(share, batch_size=batch_size, worker_init_fn=functools.partial(_init_worker, init), **options)


def _init_worker(then: Optional[Callable[[int], None]], worker_id: int) -> None:
    signals.ignore_in_worker()
    if then is not None:
        then(worker_id)
