"""A synthetic sequence data set of its own: a Dataset class, nothing of dtrain's."""

import torch
from torch.utils.data import Dataset


class Sequences(Dataset):
    """`size` sequences of `length` steps and `channels` features. The label says where in the sequence a
    bump of `channels` features was added: in the first, second, ... of `classes` equal parts. A model has
    to look along the sequence to tell them apart."""

    def __init__(self, size: int = 1024, length: int = 24, channels: int = 4, classes: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, length, channels, generator=g)
        self.y = torch.randint(0, classes, (size,), generator=g)
        part = length // classes
        start = self.y * part + torch.randint(0, part - 2, (size,), generator=g)
        steps = start[:, None] + torch.arange(3)
        self.x[torch.arange(size)[:, None], steps] += 0.8
        self.classes = [f"part{i + 1}" for i in range(classes)]  # names dtrain shows and stores

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]
