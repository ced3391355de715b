"""Streams of a user's own (tests/test_streams.py): IterableDatasets of (features, label) items, one with a
state of its own (its position) and one without, and a model that notes every item it trains on."""

import itertools
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, IterableDataset


def item(i: int):
    g = torch.Generator().manual_seed(i)
    x = torch.randn(5, generator=g)
    return {"x": x, "id": torch.tensor(i)}, int(x[0] > 0)


class Stream(IterableDataset):
    """`n` items (None: endless), read in order; no state of its own (dtrain fast-forwards it on resume)."""
    num_classes = 2

    def __init__(self, n: int | None = 203):
        self.n = n

    def __iter__(self):
        return (item(i) for i in (range(self.n) if self.n is not None else itertools.count()))

    def __len__(self):  # a finite stream says so (an endless one trains for trainer.max_steps)
        if self.n is None:
            raise TypeError("an endless stream has no length")
        return self.n


class StatefulStream(Stream):
    """The same items, with its position as its state: a resume continues from it."""

    def __init__(self, n: int | None = 203):
        super().__init__(n)
        self.position = 0

    def __iter__(self):
        while self.n is None or self.position < self.n:
            self.position += 1
            yield item(self.position - 1)
        self.position = 0

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


class Items(Dataset):
    def __init__(self, ids):
        self.ids = list(ids)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return item(self.ids[i])


def stream(n: int = 203, stateful: bool = False, val: bool = True):
    """A data factory: the stream for training, 40 other items for validation."""
    train = (StatefulStream if stateful else Stream)(n if n else None)
    return {"train": train, "val": Items(range(10_000, 10_040))} if val else train


class Noting(nn.Module):
    """A linear classifier with its own step, noting the ids it trains on in ids-rank<R>.txt (DTRAIN_IDS_DIR)."""

    def __init__(self, num_classes: int = 2):
        super().__init__()
        self.fc = nn.Linear(5, num_classes)

    def training_step(self, batch):
        inputs, y = batch
        folder = os.environ.get("DTRAIN_IDS_DIR")
        if folder:
            with open(Path(folder) / f"ids-rank{os.environ.get('RANK', '0')}.txt", "a") as f:
                f.write("".join(f"{i}\n" for i in inputs["id"].tolist()))
        return F.cross_entropy(self.fc(inputs["x"]), y)

    def validation_step(self, batch):
        inputs, y = batch
        return {"loss": F.cross_entropy(self.fc(inputs["x"]), y)}
