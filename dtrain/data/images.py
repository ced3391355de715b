"""Image data sets: the bundled MNIST sample, MNIST and CIFAR-10 in their official formats, and a folder of
the user's images (streamed from disk). torchvision is imported only by the builders that read its
formats: importing it costs seconds at every process start."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Subset

from dtrain import augment
from dtrain import world as w
from dtrain.augment import Augment
from dtrain.config import DataConfig
from dtrain.data.core import Splits, Tensors, ToFloat, split_indices
from dtrain.errors import ConfigError, DataError

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "assets" / "mnist_sample"

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


def _image_splits(cfg: DataConfig, train_x, train_y, test_x=None, test_y=None, classes=10,
                  class_names: Optional[list[str]] = None) -> Splits:
    """Splits from uint8 image tensors [N, C, H, W]; val is carved out of train."""
    tr, va = split_indices(len(train_y), cfg)
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


def mnist_sample(*, options: DataConfig, world: w.World) -> Splits:
    """The 10,000 official MNIST t10k images bundled with dtrain."""
    cfg = options
    images, labels = read_idx_pair(SAMPLE_DIR / "t10k-images-idx3-ubyte.gz", SAMPLE_DIR / "t10k-labels-idx1-ubyte.gz")
    return _image_splits(cfg, images, labels)


def _root(root: Optional[str], name: str, layout: str) -> Path:
    if not root:
        raise ConfigError(f"data.root is required for data={name}: the folder that holds {layout}")
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"data.root={root!r} does not exist: create it and put {layout} inside")
    return folder


def _load_official(name: str, root: Path, download: bool, world: w.World, layout: str, files: str, load: Callable):
    """`load(download)` -> (train, test); the main rank (down)loads first, the others then read."""
    with w.main_first(world):
        try:
            return load(download and world.is_main)
        except DataError:
            raise
        except Exception as e:  # a missing file, a failed download, a damaged file torchvision cannot read
            how = "the download failed" if download else "data.download=false"
            raise DataError(f"data={name}: files not found or unreadable in {root} ({how}: "
                            f"{str(e).splitlines()[0]}); put {files} in {layout}") from e


def mnist(root: Optional[str] = None, download: bool = True, *, options: DataConfig, world: w.World) -> Splits:
    """Full MNIST from the official IDX files in root/MNIST/raw/ (downloaded there when missing)."""
    cfg = options
    root = _root(root, cfg.name, "MNIST/raw/")
    raw = root / "MNIST" / "raw"
    pairs = [("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]

    def load(download: bool):
        if download and not all((raw / f).exists() for pair in pairs for f in pair):
            from torchvision.datasets import MNIST
            MNIST(str(root), train=True, download=True)  # fetches and unpacks all four files into MNIST/raw
        return [read_idx_pair(raw / images, raw / labels) for images, labels in pairs]

    (train_x, train_y), (test_x, test_y) = _load_official(cfg.name, root, download, world, f"{raw}/",
                                                          ", ".join(f for p in pairs for f in p), load)
    return _image_splits(cfg, train_x, train_y, test_x, test_y)


def cifar10(root: Optional[str] = None, download: bool = True, verify_checksums: bool = True, *,
            options: DataConfig, world: w.World) -> Splits:
    """CIFAR-10 (python version) in root/cifar-10-batches-py/; verify_checksums: the official files' md5."""
    cfg = options
    root = _root(root, cfg.name, "cifar-10-batches-py/")
    files = "data_batch_1..5, test_batch and batches.meta (the CIFAR-10 python version)"
    from torchvision.datasets import CIFAR10

    class Checked(CIFAR10):
        def __init__(self, train: bool, download: bool):
            if not verify_checksums:  # torchvision's check_integrity(path, None) only checks existence
                self.train_list = [(f, None) for f, _ in self.train_list]
                self.test_list = [(f, None) for f, _ in self.test_list]
                self.meta = {**self.meta, "md5": None}
            super().__init__(str(root), train=train, download=download)

    def load(download: bool):
        return Checked(True, download), Checked(False, False)

    train, test = _load_official(cfg.name, root, download, world, f"{root}/cifar-10-batches-py/", files, load)

    def chw(d) -> tuple[torch.Tensor, torch.Tensor]:
        if len(d.data) != len(d.targets):
            raise DataError(f"data=cifar10: the batches in {root}/cifar-10-batches-py hold {len(d.data)} images "
                            f"but {len(d.targets)} labels; replace them with the official files")
        return torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(d.targets)

    return _image_splits(cfg, *chw(train), *chw(test), classes=len(train.classes), class_names=list(train.classes))


def imagefolder(root: Optional[str] = None, image_size: int = 32, *, options: DataConfig, world: w.World) -> Splits:
    """The user's images in root/train/<class>/, optional root/val/ and root/test/, streamed from disk and
    resized to image_size x image_size."""
    cfg, given = options, root
    root = _root(root, cfg.name, "train/<class>/<image> (and optionally val/ and test/)")
    if not (root / "train").is_dir():
        raise ConfigError(f"data.root={given!r} has no train/ folder: put images in train/<class>/")
    from torchvision.datasets import ImageFolder
    to_float, augmented = _transforms(cfg, None, 3)
    resize = [resizer(image_size)]
    one = [lambda x: augmented(x[None])[0]] if augmented is not None else []  # a batch of one image
    from torchvision.transforms import v2
    train_tf, eval_tf = v2.Compose(resize + one + [to_float]), v2.Compose(resize + [to_float])

    def folder(name: str, tf) -> Optional[ImageFolder]:
        return ImageFolder(str(root / name), transform=tf, loader=read_rgb) if (root / name).is_dir() else None

    try:
        train = folder("train", train_tf)
        val, test = folder("val", eval_tf), folder("test", eval_tf)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"data=imagefolder: {e}; put images in {root}/train/<class>/") from e
    if val is None:  # carve val out of train, seen through the eval transform
        tr, va = split_indices(len(train), cfg)
        val = Subset(ImageFolder(str(root / "train"), transform=eval_tf, loader=read_rgb), va.tolist())
        train = Subset(train, tr.tolist())
    names = folder("train", None).classes
    return Splits(train, val, test, "classification", (3, image_size, image_size), len(names), names,
                  to_float, image_size)


# The files torchvision.io decodes faster than PIL (by their first bytes, whatever their name): PNG, JPEG
_FAST_SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff")


def read_rgb(path: str, context: str = "data=imagefolder: ") -> torch.Tensor:
    """One image file as uint8 RGB [3, H, W]. PNG and JPEG by torchvision.io.decode_image (libpng/libjpeg:
    1.8x PIL's images/s on PNG, 2.7x on JPEG here, benchmarks/RESULTS.md), everything else (and a 16-bit
    PNG, which it reads as 16 bits) by PIL; the same pixels either way (JPEG within one grey level). A file
    neither reads is a DataError naming it."""
    try:
        from torchvision.io import ImageReadMode, decode_image, read_file
        data = read_file(path)
        if bytes(data[:4].tolist()).startswith(_FAST_SIGNATURES):
            image = decode_image(data, mode=ImageReadMode.RGB)
            if image.dtype == torch.uint8 and image.ndim == 3:
                return image
    except (ImportError, RuntimeError, ValueError):  # torchvision.io's decoding is deprecated: PIL stays
        pass
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor
    try:
        with open(path, "rb") as f:
            return pil_to_tensor(Image.open(f).convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError (an OSError), truncated data
        raise DataError(f"{context}{path} is not a readable image ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]}); remove or replace it") from None


def resizer(image_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 [3, H, W] -> uint8 [3, image_size, image_size] (bilinear, antialiased): what training on an
    image folder does to each image, and so what predict does to an image for such a model."""
    from torchvision.transforms import v2
    return v2.Compose([v2.ToImage(), v2.Resize((image_size, image_size)), v2.ToDtype(torch.uint8)])


for _builder in (mnist_sample, mnist, cifar10, imagefolder):
    _builder.dtrain_task = "classification"  # data.task is refused: these decide their own


def _check_image_size(options: DataConfig, image_size: int = 32, **_) -> None:
    if image_size < 1:
        raise ConfigError(f"data.image_size={image_size} is not allowed: must be >= 1")


imagefolder.dtrain_check = lambda cfg: _check_image_size(cfg, **cfg.kwargs)
