"""What the benchmark's hand-written contestants share, so they train exactly what dtrain trains: the
bundled MNIST sample read straight from its IDX files, split 9,000 / 1,000 as dtrain splits it, and the
model classes (the network is not the framework; the loop and the data path are)."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import torch

SAMPLE = Path(__file__).resolve().parent.parent / "dtrain" / "assets" / "mnist_sample"


def mnist_sample() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 images [N, 1, 28, 28] and labels, as (train_x, train_y, val_x, val_y)."""
    images = np.frombuffer(gzip.open(SAMPLE / "t10k-images-idx3-ubyte.gz").read(), np.uint8, offset=16)
    labels = np.frombuffer(gzip.open(SAMPLE / "t10k-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    x, y = torch.from_numpy(images.reshape(-1, 1, 28, 28).copy()), torch.from_numpy(labels.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))  # dtrain's data.split_seed=0
    val, train = perm[:1000], perm[1000:]
    return x[train], y[train], x[val], y[val]


def model(name: str) -> torch.nn.Module:
    from dtrain import models
    return models.build(models.builtin(name), "classification", (1, 28, 28), 10, "mnist_sample")


def report(samples_per_sec: list[float], val_acc: float) -> None:
    """One JSON line the benchmark driver reads: samples/s of every epoch, final validation accuracy."""
    print("RESULT " + json.dumps({"samples_per_sec": samples_per_sec, "val_acc": val_acc}), file=sys.stdout,
          flush=True)
