"""Data sets (registered by name) and the rank-aware loaders.

Every builder returns `Splits`: train/val(/test) datasets yielding (input, target) plus what the model
needs to know (task, input shape, output size). Data sets that fit in memory are `Tensors` (images as
uint8) and train from the device (`DeviceLoader`: index slices, batched augmentation); files on disk
(imagefolder) stream through a DataLoader (`StreamLoader`). Both give a rank the same samples per epoch
(`epoch_order`). torchvision is imported only by the builders that read its formats (mnist, cifar10,
imagefolder): importing it costs seconds at every process start.
"""

from __future__ import annotations

import functools
import gzip
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from dtrain import augment, signals
from dtrain import world as w
from dtrain.augment import Augment
from dtrain.config import Config, DataConfig, DataPath
from dtrain.errors import ConfigError, DataError

SAMPLE_DIR = Path(__file__).parent / "assets" / "mnist_sample"


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

    def describe(self) -> dict:
        """What a trained model needs to be used without the data set: its task, input shape, outputs,
        class names and the exact preprocessing (saved in every checkpoint)."""
        mean = std = None
        if self.to_float is not None and self.to_float.mean is not None:
            mean, std = self.to_float.mean.flatten().tolist(), self.to_float.std.flatten().tolist()
        elif self.scaler is not None:
            mean, std = self.scaler
        return {"task": self.task, "shape": list(self.shape), "out": self.out,
                "classes": self.class_names or ([str(i) for i in range(self.out)] if self.task == "classification"
                                                 else None),
                "images": self.to_float is not None, "resize": self.resize, "mean": mean, "std": std,
                "features": self.features, "target": self.target}


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

    def take(self, index) -> "Tensors":
        return Tensors(self.x[index], self.y[index], self.to_float, self.augment)

    def to(self, device: torch.device) -> "Tensors":
        return Tensors(self.x.to(device), self.y.to(device),
                       self.to_float.to(device) if self.to_float is not None else None, self.augment)


def _transforms(cfg: DataConfig, images: torch.Tensor | None, channels: int) -> tuple[ToFloat, Optional[Augment]]:
    """The normalisation and the training augmentation of uint8 images. Mean/std default to the training
    images' own."""
    mean = std = None
    if cfg.normalize:
        if cfg.mean is not None or cfg.std is not None:
            mean, std = cfg.mean or [0.5] * channels, cfg.std or [0.5] * channels
        elif images is not None:
            x = images.float().div_(255).transpose(0, 1).reshape(channels, -1)
            mean, std = x.mean(1).tolist(), x.std(1).tolist()
        else:
            mean, std = [0.5] * channels, [0.5] * channels
        if len(mean) != channels or len(std) != channels:
            raise ConfigError(f"data.mean/data.std={mean}/{std} need {channels} value(s), one per channel")
    return ToFloat(mean, std), augment.build(cfg)


def _split(n: int, cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic train/val index split that depends only on data.split_seed."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.split_seed))
    n_val = max(1, int(round(n * cfg.val_fraction)))
    return perm[n_val:], perm[:n_val]


def _image_splits(cfg: DataConfig, train_x, train_y, test_x=None, test_y=None, classes=10,
                  class_names: Optional[list[str]] = None) -> Splits:
    """Splits from uint8 image tensors [N, C, H, W]; val is carved out of train."""
    tr, va = _split(len(train_y), cfg)
    to_float, augmented = _transforms(cfg, train_x[tr], train_x.shape[1])
    train_y = train_y.long()
    test = Tensors(test_x, test_y.long(), to_float) if test_x is not None else None
    return Splits(Tensors(train_x[tr], train_y[tr], to_float, augmented), Tensors(train_x[va], train_y[va], to_float),
                  test, "classification", tuple(train_x.shape[1:]), classes, class_names, to_float)


def read_idx(path: Path, rank: int) -> torch.Tensor:
    """One IDX file, MNIST's format (also gzipped): magic bytes 0, 0, 0x08 (uint8), rank; big-endian int32
    sizes; the data. Anything else is a DataError naming the file."""
    replace = "replace it with the official file"
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path} is not a readable gzip file ({e}); {replace}") from e
    if len(raw) < 4 + 4 * rank or raw[:3] != b"\x00\x00\x08" or raw[3] != rank:
        raise DataError(f"{path} is not an MNIST IDX file of {rank} dimension(s) (it starts with "
                        f"{raw[:4].hex() or 'nothing'}); {replace}")
    dims = np.frombuffer(raw, dtype=">i4", count=rank, offset=4)
    expected = 4 + 4 * rank + int(np.prod(dims.astype(np.int64)))
    if len(raw) != expected:
        raise DataError(f"{path} holds {len(raw)} bytes but its header announces {' x '.join(map(str, dims))} "
                        f"({expected} bytes): truncated or damaged; {replace}")
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * rank).reshape(dims).copy())


def read_idx_pair(images: Path, labels: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, 1, H, W] uint8 images and their N labels; counts that differ are a DataError, not a silent trim."""
    x, y = read_idx(images, 3), read_idx(labels, 1)
    if len(x) != len(y):
        raise DataError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels; the two files "
                        "must come from the same release")
    return x.unsqueeze(1), y


def mnist_sample(cfg: DataConfig, world: w.World) -> Splits:
    images, labels = read_idx_pair(SAMPLE_DIR / "t10k-images-idx3-ubyte.gz", SAMPLE_DIR / "t10k-labels-idx1-ubyte.gz")
    return _image_splits(cfg, images, labels)


def _root(cfg: DataConfig, layout: str) -> Path:
    if not cfg.root:
        raise ConfigError(f"data.root is required for data={cfg.name}: the folder that holds {layout}")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data.root={cfg.root!r} does not exist: create it and put {layout} inside")
    return root


def _load_official(cfg: DataConfig, world: w.World, layout: str, files: str, load: Callable):
    """`load(download)` -> (train, test); the main rank (down)loads first, the others then read."""
    with w.main_first(world):
        try:
            return load(cfg.download and world.is_main)
        except DataError:
            raise
        except Exception as e:  # a missing file, a failed download, a damaged file torchvision cannot read
            how = "the download failed" if cfg.download else "data.download=false"
            raise DataError(f"data={cfg.name}: files not found or unreadable in {cfg.root} ({how}: "
                            f"{str(e).splitlines()[0]}); put {files} in {layout}") from e


def mnist(cfg: DataConfig, world: w.World) -> Splits:
    root = _root(cfg, "MNIST/raw/")
    raw = root / "MNIST" / "raw"
    pairs = [("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]

    def load(download: bool):
        if download and not all((raw / f).exists() for pair in pairs for f in pair):
            from torchvision.datasets import MNIST
            MNIST(str(root), train=True, download=True)  # fetches and unpacks all four files into MNIST/raw
        return [read_idx_pair(raw / images, raw / labels) for images, labels in pairs]

    (train_x, train_y), (test_x, test_y) = _load_official(cfg, world, f"{raw}/",
                                                          ", ".join(f for p in pairs for f in p), load)
    return _image_splits(cfg, train_x, train_y, test_x, test_y)


def cifar10(cfg: DataConfig, world: w.World) -> Splits:
    root = _root(cfg, "cifar-10-batches-py/")
    files = "data_batch_1..5, test_batch and batches.meta (the CIFAR-10 python version)"
    from torchvision.datasets import CIFAR10

    class Checked(CIFAR10):
        def __init__(self, train: bool, download: bool):
            if not cfg.verify_checksums:  # torchvision's check_integrity(path, None) only checks existence
                self.train_list = [(f, None) for f, _ in self.train_list]
                self.test_list = [(f, None) for f, _ in self.test_list]
                self.meta = {**self.meta, "md5": None}
            super().__init__(str(root), train=train, download=download)

    def load(download: bool):
        return Checked(True, download), Checked(False, False)

    train, test = _load_official(cfg, world, f"{root}/cifar-10-batches-py/", files, load)

    def chw(d) -> tuple[torch.Tensor, torch.Tensor]:
        if len(d.data) != len(d.targets):
            raise DataError(f"data=cifar10: the batches in {root}/cifar-10-batches-py hold {len(d.data)} images "
                            f"but {len(d.targets)} labels; replace them with the official files")
        return torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(d.targets)

    return _image_splits(cfg, *chw(train), *chw(test), classes=len(train.classes), class_names=list(train.classes))


def imagefolder(cfg: DataConfig, world: w.World) -> Splits:
    """The user's images in root/train/<class>/, optional root/val/ and root/test/, streamed from disk."""
    root = _root(cfg, "train/<class>/<image> (and optionally val/ and test/)")
    if not (root / "train").is_dir():
        raise ConfigError(f"data.root={cfg.root!r} has no train/ folder: put images in train/<class>/")
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2
    to_float, augmented = _transforms(cfg, None, 3)
    resize = [v2.ToImage(), v2.Resize((cfg.image_size, cfg.image_size)), v2.ToDtype(torch.uint8)]
    one = [lambda x: augmented(x[None])[0]] if augmented is not None else []  # a batch of one image
    train_tf, eval_tf = v2.Compose(resize + one + [to_float]), v2.Compose(resize + [to_float])

    def folder(name: str, tf) -> Optional[ImageFolder]:
        return ImageFolder(str(root / name), transform=tf, loader=read_rgb) if (root / name).is_dir() else None

    try:
        train = folder("train", train_tf)
        val, test = folder("val", eval_tf), folder("test", eval_tf)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"data=imagefolder: {e}; put images in {root}/train/<class>/") from e
    if val is None:  # carve val out of train, seen through the eval transform
        tr, va = _split(len(train), cfg)
        val = Subset(ImageFolder(str(root / "train"), transform=eval_tf, loader=read_rgb), va.tolist())
        train = Subset(train, tr.tolist())
    names = folder("train", None).classes
    return Splits(train, val, test, "classification", (3, cfg.image_size, cfg.image_size), len(names), names,
                  to_float, cfg.image_size)


def read_rgb(path: str):
    """One image file as an RGB PIL image; a file PIL cannot read is a DataError naming it."""
    from PIL import Image
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError (an OSError), truncated data
        raise DataError(f"data=imagefolder: {path} is not a readable image ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]}); remove or replace it") from None


def synthetic(cfg: DataConfig, world: w.World) -> Splits:
    """Random inputs of any shape whose labels a fixed random linear map decides (so they are learnable)."""
    g = torch.Generator().manual_seed(cfg.split_seed)
    n, shape = cfg.num_samples, tuple(cfg.shape)
    x = torch.randn(n, *shape, generator=g)
    proj = torch.randn(math.prod(shape), cfg.num_classes, generator=g)
    y = (x.flatten(1) @ proj).argmax(1)
    return _tensor_splits(cfg, x, y, "classification", cfg.num_classes)


def regression(cfg: DataConfig, world: w.World) -> Splits:
    """y = x . coef + bias + noise, with coefficients fixed by data.split_seed (see `regression_truth`)."""
    coef, bias = regression_truth(cfg)
    g = torch.Generator().manual_seed(cfg.split_seed + 1)
    x = torch.randn(cfg.num_samples, *cfg.shape, generator=g)
    y = x.flatten(1) @ coef + bias + cfg.noise * torch.randn(cfg.num_samples, 1, generator=g)
    return _tensor_splits(cfg, x, y, "regression", 1)


def regression_truth(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.split_seed)
    return torch.randn(math.prod(cfg.shape), 1, generator=g), torch.randn(1, generator=g)


def _tensor_splits(cfg: DataConfig, x, y, task: str, out: int, standardize: bool = False, **described) -> Splits:
    """Train/val/test as 80/10/10 (val set by data.val_fraction; test the same size). With `standardize`,
    every split is standardised with the training split's mean and std per feature (or data.mean/data.std),
    as scikit-learn's StandardScaler does: population std, and 1 for a constant feature."""
    if cfg.augment:
        raise ConfigError(f"data.augment={list(cfg.augment)} transforms images, but data={cfg.name} holds feature "
                          "vectors; set data.augment=[]")
    tr, va = _split(len(y), cfg)
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


def read_table(path: Path) -> tuple[list[str], list[list[str]]]:
    """A CSV file's header (column names) and rows of cells; the delimiter (, ; or tab) is read off the
    header. A missing or empty file, a file without rows, or a row of the wrong length is a DataError."""
    import csv
    if not path.is_file():
        raise DataError(f"data.path={str(path)!r} does not exist: give a CSV file whose first line names the "
                        "columns")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not part of the first name
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not a readable text file ({e}); give a CSV file") from e
    lines = text.splitlines()
    if not any(line.strip() for line in lines):
        raise DataError(f"{path} is empty; a CSV file needs a header row naming the columns and one row per sample")
    try:
        dialect = csv.Sniffer().sniff(lines[0], delimiters=",;\t")
    except csv.Error:  # one column: nothing to sniff
        dialect = csv.excel
    table = [row for row in csv.reader(lines, dialect) if any(cell.strip() for cell in row)]
    header, rows = [name.strip() for name in table[0]], table[1:]
    if all(_is_number(name) for name in header):
        raise DataError(f"{path} has no header row (its first line is numbers); add a first line naming the "
                        "columns")
    twice = sorted({n for n in header if header.count(n) > 1})
    if twice:
        raise DataError(f"{path} names a column twice ({', '.join(twice)})")
    if not rows:
        raise DataError(f"{path} has a header but no rows of data")
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise DataError(f"{path}: data row {i + 1} has {len(row)} cells but the header names {len(header)} "
                            "columns")
    return header, rows


def _is_number(cell: str) -> bool:
    try:
        return math.isfinite(float(cell))
    except ValueError:
        return False


def table_columns(path: Path, header: list[str], rows: list[list[str]], names: list[str]) -> torch.Tensor:
    """The columns `names` as a float tensor [rows, len(names)]; an empty or non-numeric cell is a DataError
    naming its row and column."""
    index = [header.index(n) for n in names]
    out = np.empty((len(rows), len(names)), dtype=np.float64)
    for i, row in enumerate(rows):
        for j, k in enumerate(index):
            cell = row[k].strip()
            if not _is_number(cell):
                what = "is empty" if not cell else f"holds {cell[:40]!r}, not a finite number"
                raise DataError(f"{path}: data row {i + 1}, column {names[j]!r} {what}; feature and regression "
                                "target columns must be numbers (fill or drop missing values)")
            out[i, j] = float(cell)
    return torch.from_numpy(out).float()


def csv_table(cfg: DataConfig, world: w.World) -> Splits:
    """A table from data.path: data.target is predicted from data.features (or every other column), as
    regression or classification (data.task; class labels may be any text); features standardised."""
    path = Path(cfg.path).expanduser()
    header, rows = read_table(path)
    features = list(cfg.features) if cfg.features is not None else [c for c in header if c != cfg.target]
    missing = [c for c in [cfg.target, *features] if c not in header]
    if missing:
        raise DataError(f"{path} has no column {', '.join(map(repr, missing))} (data.target, data.features); "
                        f"its columns are {', '.join(header)}")
    if not features:
        raise DataError(f"{path} has no column besides data.target={cfg.target!r} to learn from")
    x = table_columns(path, header, rows, features)
    if cfg.task.value == "regression":
        y, out, classes = table_columns(path, header, rows, [cfg.target]), 1, None
    else:
        labels = [row[header.index(cfg.target)].strip() for row in rows]
        classes = sorted(set(labels))
        if all(map(_is_number, classes)):  # numeric labels in numeric order: 2 before 10
            classes.sort(key=float)
        if len(classes) < 2:
            raise DataError(f"{path}: column {cfg.target!r} holds one class ({classes[0]!r}); classification "
                            "needs two or more")
        code = {c: i for i, c in enumerate(classes)}
        y, out = torch.tensor([code[v] for v in labels]), len(classes)
    if len(rows) < 3:
        raise DataError(f"{path} has {len(rows)} row(s): too few for training, validation and test splits")
    return _tensor_splits(cfg, x, y, cfg.task.value, out, standardize=cfg.normalize, class_names=classes,
                          features=features, target=cfg.target)


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
        return _worker_errors_in_one_line(batches)


def _worker_errors_in_one_line(batches):
    """A DataError raised in a worker arrives wrapped in the worker's traceback; keep its own line."""
    try:
        yield from batches
    except DataError as e:
        raise DataError(str(e).rstrip().splitlines()[-1].split("DataError: ", 1)[-1]) from None


def _init_worker(then: Optional[Callable[[int], None]], worker_id: int) -> None:
    signals.ignore_in_worker()
    if then is not None:
        then(worker_id)


class DeviceLoader:
    """The fast path for data that fits in memory: the data set lives on the device as tensors (uint8
    images stay uint8), each batch is an index slice of this rank's share of the epoch order (the same
    samples as the DataLoader path), augmented and normalised as one batch, with no worker, no collate and
    no host-to-device copy. Augmentation draws from a stream seeded by (seed, rank, epoch, batch), so a
    resumed epoch sees the same crops."""

    def __init__(self, data: Tensors, world: w.World, batch_size: int, *, train: bool, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False):
        self.dataset, self.world, self.batch_size = data.to(world.device), world, batch_size
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


def train_loader(ds: Dataset, cfg: Config, world: w.World, shuffle: bool = True):
    per_rank = cfg.data.batch_size // world.world_size
    sampler = TrainSampler(len(ds), world, shuffle, cfg.seed, cfg.data.drop_last)
    if len(sampler) < per_rank and cfg.data.drop_last:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is larger than the training split "
                          f"({len(ds)} samples): no full batch fits; lower it or set data.drop_last=false")
    if on_device(ds, cfg.data):
        return DeviceLoader(ds, world, per_rank, train=True, seed=cfg.seed, shuffle=shuffle,
                            drop_last=cfg.data.drop_last)
    return StreamLoader(ds, batch_size=per_rank, sampler=sampler, drop_last=cfg.data.drop_last,
                        generator=torch.Generator().manual_seed(cfg.seed + world.rank), **_stream_options(cfg, world))


def eval_loader(ds: Dataset, cfg: Config, world: w.World):
    per_rank = cfg.data.eval_batch_size // world.world_size
    if on_device(ds, cfg.data):
        return DeviceLoader(ds, world, per_rank, train=False)
    return StreamLoader(ds, batch_size=per_rank, sampler=ShardSampler(len(ds), world), **_stream_options(cfg, world))


def _stream_options(cfg: Config, world: w.World) -> dict:
    d, workers = cfg.data, cfg.data.num_workers
    return {"num_workers": workers,
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
    val: DeviceLoader | StreamLoader
    test: Optional[DeviceLoader | StreamLoader]


def loaders(splits: Splits, cfg: Config, world: w.World) -> Loaders:
    """The rank-aware loaders of a run. debug.overfit_batches trains and validates on the same few fixed
    batches (and has no test)."""
    train, val, test = splits.train, splits.val, splits.test
    if cfg.debug.overfit_batches:
        first = range(min(len(train), cfg.debug.overfit_batches * cfg.data.batch_size))
        train = val = train.take(first) if isinstance(train, Tensors) else Subset(train, first)
        test = None
    return Loaders(train_loader(train, cfg, world, shuffle=not cfg.debug.overfit_batches),
                   eval_loader(val, cfg, world), eval_loader(test, cfg, world) if test is not None else None)
