"""What every data set becomes: `Splits` (train/val/test plus what the model needs to know), data sets held
as tensors (`Tensors`, images kept as uint8 and normalised on the fly by `ToFloat`), and the deterministic
train/val/test carving."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.utils.data import Dataset

from dtrain import tasks
from dtrain.augment import Augment
from dtrain.config import DataConfig
from dtrain.errors import ConfigError

@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Optional[Dataset]
    task: str  # a name in tasks.TASKS
    shape: tuple[int, ...]  # one input's shape
    out: int  # classes, or regression targets
    class_names: Optional[list[str]] = None  # None: the class indices
    to_float: Optional[ToFloat] = None  # images: uint8 pixels -> normalised floats (None: inputs are used as they are)
    resize: Optional[int] = None  # images are resized to this square first (imagefolder)
    # Tables (csv): the feature columns in input order, the target column, and the (mean, std) per feature the
    # inputs were standardised with (None: not standardised)
    features: Optional[list[str]] = None
    target: Optional[str] = None
    scaler: Optional[tuple[list[float], list[float]]] = None
    input_dtype: Optional[str] = None  # a user's data set: the inputs' dtype (None: float32)
    baselines: dict = field(default_factory=dict)  # reference figures for the summary (data=text: the unigram's)

    def names(self) -> list[str]:
        """The class names (classification): given, else the class indices."""
        return self.class_names or [str(i) for i in range(self.out)]

    def describe(self) -> dict:
        """What a trained model needs to be used without the data set: its task, input shape, outputs,
        class names and the exact preprocessing (saved in every checkpoint)."""
        mean = std = None
        if self.to_float is not None and self.to_float.mean is not None:
            mean, std = self.to_float.mean.flatten().tolist(), self.to_float.std.flatten().tolist()
        elif self.scaler is not None:
            mean, std = self.scaler
        return {"task": self.task, "shape": list(self.shape), "out": self.out,
                "classes": tasks.get(self.task).class_names(self.class_names, self.out),
                "images": self.to_float is not None, "resize": self.resize, "mean": mean, "std": std,
                "features": self.features, "target": self.target, "input_dtype": self.input_dtype}


class ToFloat:
    """uint8 images (CHW or NCHW) -> float in [0, 1], then (x - mean) / std per channel when normalising."""

    def __init__(self, mean: Optional[list[float]], std: Optional[list[float]]):
        self.mean = torch.tensor(mean).view(-1, 1, 1) if mean is not None else None
        self.std = torch.tensor(std).view(-1, 1, 1) if std is not None else None
        # (x / 255 - mean) / std as one multiply and one add
        self.scale = 1 / (255 * self.std) if std is not None else torch.tensor(1 / 255)
        self.shift = -self.mean / self.std if mean is not None else torch.tensor(0.0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mul_(self.scale).add_(self.shift)

    def to(self, device: torch.device) -> "ToFloat":
        moved = ToFloat(None, None)
        moved.mean, moved.std = [t.to(device) if t is not None else None for t in (self.mean, self.std)]
        moved.scale, moved.shift = self.scale.to(device), self.shift.to(device)
        return moved


class Tensors(Dataset):
    """A data set held as tensors: inputs `x` (uint8 images [N, C, H, W], or float features) and labels `y`.
    Images are augmented (optional) and turned into normalised floats on the fly, one sample at a time for
    a DataLoader or a whole batch of indices at once on the device (`batch`): the same steps either way."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, to_float: Optional[ToFloat] = None,
                 augment: Optional[Augment] = None):
        self.x, self.y, self.to_float, self.augment = x, y, to_float, augment

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        x, y = self.batch(slice(i, i + 1))
        return x[0], y[0]

    def batch(self, index: torch.Tensor | slice,
              generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        # index_select: a tenth of the time of x[index] for a batch of images on the CPU
        x, y = (self.x[index], self.y[index]) if isinstance(index, slice) else \
            (self.x.index_select(0, index), self.y.index_select(0, index))
        if self.augment is not None:
            x = self.augment(x, generator)
        return (self.to_float(x) if self.to_float is not None else x), y

    def prepared(self, limit_bytes: int = 2 << 30) -> "Tensors":
        """Normalised once, as floats, when no augmentation draws per batch and they fit in `limit_bytes`
        (on a GPU also in a quarter of its free memory): a batch is then one index_select, as in a
        hand-written loop, with the same numbers (the conversion is elementwise). Else, or when the device
        runs out of memory making them, the uint8 images stay and each batch is converted."""
        if self.augment is not None or self.to_float is None:
            return self
        if self.x.is_cuda:
            limit_bytes = min(limit_bytes, torch.cuda.mem_get_info(self.x.device)[0] // 4)
        if self.x.numel() * 4 > limit_bytes:
            return self
        try:
            return Tensors(self.to_float(self.x).contiguous(), self.y)
        except torch.OutOfMemoryError:
            return self

    def take(self, index) -> "Tensors":
        return Tensors(self.x[index], self.y[index], self.to_float, self.augment)

    def to(self, device: torch.device) -> "Tensors":
        return Tensors(self.x.to(device), self.y.to(device),
                       self.to_float.to(device) if self.to_float is not None else None, self.augment)


def split_indices(n: int, cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic train/val index split that depends only on data.split_seed."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.split_seed))
    n_val = max(1, int(round(n * cfg.val_fraction)))
    return perm[n_val:], perm[:n_val]


def tensor_splits(cfg: DataConfig, x, y, task: str, out: int, standardize: bool = False, **described) -> Splits:
    """Train/val/test as 80/10/10 (val set by data.val_fraction; test the same size). With `standardize`,
    every split is standardised with the training split's mean and std per feature (or data.mean/data.std),
    as scikit-learn's StandardScaler does: population std, and 1 for a constant feature."""
    if cfg.augment:
        raise ConfigError(f"data.augment={list(cfg.augment)} transforms images, but data={cfg.name} holds feature "
                          "vectors; set data.augment=[]")
    tr, va = split_indices(len(y), cfg)
    n_test = len(va)
    te, tr = tr[:n_test], tr[n_test:]
    scaler = None
    if standardize:
        if cfg.mean is not None or cfg.std is not None:
            mean = torch.tensor(cfg.mean or [0.0] * x.shape[1])
            std = torch.tensor(cfg.std or [1.0] * x.shape[1])
            if len(mean) != x.shape[1] or len(std) != x.shape[1]:
                raise ConfigError(f"data.mean/data.std={cfg.mean}/{cfg.std} need {x.shape[1]} values, one per "
                                  "feature")
        else:
            mean, std = x[tr].mean(0), x[tr].std(0, unbiased=False)
            std = torch.where(std > 0, std, torch.ones_like(std))
        x = (x - mean) / std
        scaler = (mean.tolist(), std.tolist())
    return Splits(Tensors(x[tr], y[tr]), Tensors(x[va], y[va]), Tensors(x[te], y[te]), task, tuple(x.shape[1:]), out,
                  scaler=scaler, **described)
