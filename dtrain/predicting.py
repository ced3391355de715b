"""Predictions of a trained model for files of inputs: images (one, or a folder), .npy/.pt tensors, or a CSV
table, each read with the preprocessing the model was trained with. `python -m dtrain.predict` is its
command line."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from dtrain.errors import BadInput

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}


def read_image(path: Path, info: dict) -> torch.Tensor:
    """One image file as uint8 [C, H, W], checked against (or, for imagefolder models, resized to) the
    input the model takes."""
    from PIL import Image, UnidentifiedImageError
    c, h, w = info["shape"]
    if info["resize"]:  # trained on imagefolder: RGB, decoded and resized exactly as in training
        from dtrain.data import images
        return images.resizer(info["resize"])(images.read_rgb(str(path), context="")).as_subclass(torch.Tensor)
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError) as e:
        raise BadInput(f"{path} is not a readable image ({e})") from e
    bands = len(image.getbands())
    if image.mode in ("P", "1", "I;16", "I", "F"):
        image, bands = image.convert("L"), 1
    if bands != c:
        raise BadInput(f"{path} has {bands} channel(s) ({image.mode}) but the model takes {c} ({c}x{h}x{w} "
                       f"images); convert it to {'grayscale' if c == 1 else 'RGB'}")
    if image.size != (w, h):
        raise BadInput(f"{path} is {image.size[0]}x{image.size[1]} pixels but the model takes {w}x{h}; resize it")
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.reshape(h, w, c).copy()).permute(2, 0, 1)


def read_tensor(path: Path, info: dict) -> torch.Tensor:
    """A .npy or .pt file as a batch [N, *shape]."""
    try:
        x = torch.from_numpy(np.load(path, allow_pickle=False)) if path.suffix == ".npy" else \
            torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BadInput(f"{path} is not a readable {path.suffix} tensor file ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:120]})") from e
    if not isinstance(x, torch.Tensor):
        raise BadInput(f"{path} holds a {type(x).__name__}, not a tensor")
    shape = tuple(info["shape"])
    if tuple(x.shape) == shape:
        x = x.unsqueeze(0)
    if tuple(x.shape[1:]) != shape:
        raise BadInput(f"{path} holds a tensor of shape {list(x.shape)} but the model takes {list(shape)} or "
                       f"[N, {', '.join(map(str, shape))}]")
    return x


def read_table_rows(path: Path, info: dict) -> tuple[list[str], torch.Tensor]:
    """The rows of a CSV file as raw feature vectors, by the column names the model was trained on."""
    from dtrain import data
    features = info.get("features")
    if not features:
        raise BadInput(f"input={path}: this model was not trained on a table (data=csv); give "
                       + ("images" if info["images"] else "a .npy or .pt file"))
    header, rows = data.read_table(path)
    missing = [f for f in features if f not in header]
    if missing:
        raise BadInput(f"input={path} has no column {', '.join(map(repr, missing))}; the model takes "
                       f"{', '.join(features)}")
    return [f"{path.name}:{i + 1}" for i in range(len(rows))], data.table_columns(path, header, rows, features)


def read_inputs(path: Path, info: dict) -> tuple[list[str], torch.Tensor]:
    """Names and the batch of raw inputs at `path`."""
    if not path.exists():
        raise BadInput(f"input={path} does not exist")
    if path.suffix in (".npy", ".pt"):
        x = read_tensor(path, info)
        return [f"{path.name}[{i}]" for i in range(len(x))], x
    if path.suffix.lower() == ".csv":
        return read_table_rows(path, info)
    if not info["images"]:
        raise BadInput(f"input={path}: this model takes {info['shape']} feature tensors; give a .npy or .pt file"
                       + (" or a .csv file" if info.get("features") else ""))
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise BadInput(f"input={path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return [str(f) for f in files], torch.stack([read_image(f, info) for f in files])


def predict(model, path: Path, topk: int = 5) -> list[dict]:
    """One dict per input: name, and the top-k classes with probabilities (or the predicted values)."""
    from dtrain import tasks
    names, x = read_inputs(path, model.info)
    out = torch.cat([model.predict(x[i:i + 256]) for i in range(0, len(x), 256)]).cpu()
    return tasks.get(model.info["task"]).prediction_rows(names, out, model.info["classes"], topk)


def write_csv(rows: list[dict], out: Path) -> None:
    check_out(out)
    with open(out, "x", newline="") as f:
        writer = csv.writer(f)
        if "top" in rows[0]:
            k = len(rows[0]["top"])
            writer.writerow(["input", *(f"{kind}{i + 1}" for i in range(k) for kind in ("class", "prob"))])
            writer.writerows([r["input"], *(v for c, p in r["top"] for v in (c, f"{p:.6f}"))] for r in rows)
        else:
            writer.writerow(["input", *(f"value{i + 1}" for i in range(len(rows[0]["prediction"])))])
            writer.writerows([r["input"], *r["prediction"]] for r in rows)


def check_out(out: Path) -> None:
    """Before predicting: the CSV can be written (its folder exists) and writes over nothing."""
    if out.exists():
        raise BadInput(f"out={out} exists; choose another file (dtrain does not overwrite it)")
    if not out.parent.is_dir():
        raise BadInput(f"out={out}: the folder {out.parent} does not exist; create it or choose another out=")
