"""Feature data: random synthetic classification and regression sets, and tables read from CSV files."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from dtrain import tasks
from dtrain import world as w
from dtrain.config import DataConfig
from dtrain.validate import fail
from dtrain.data.core import Splits, tensor_splits
from dtrain.errors import DataError


def synthetic(shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, num_samples: int = 2048, *,
              options: DataConfig, world: w.World) -> Splits:
    """Random inputs of any shape whose labels a fixed random linear map decides (so they are learnable);
    the draw is fixed by data.split_seed."""
    g = torch.Generator().manual_seed(options.split_seed)
    x = torch.randn(num_samples, *shape, generator=g)
    proj = torch.randn(math.prod(shape), num_classes, generator=g)
    y = (x.flatten(1) @ proj).argmax(1)
    return tensor_splits(options, x, y, "classification", num_classes)


def regression(shape: Sequence[int] = (8,), num_samples: int = 2048, noise: float = 0.1, *,
               options: DataConfig, world: w.World) -> Splits:
    """y = x . coef + bias + noise, with coefficients fixed by data.split_seed (see `regression_truth`)."""
    coef, bias = regression_truth(shape, options.split_seed)
    g = torch.Generator().manual_seed(options.split_seed + 1)
    x = torch.randn(num_samples, *shape, generator=g)
    y = x.flatten(1) @ coef + bias + noise * torch.randn(num_samples, 1, generator=g)
    return tensor_splits(options, x, y, "regression", 1)


def regression_truth(shape: Sequence[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The coefficients and bias of `regression` for inputs of `shape` and data.split_seed `seed`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(math.prod(shape), 1, generator=g), torch.randn(1, generator=g)


def _check_generated(cfg: DataConfig, shape: Sequence[int] = (1,), num_samples: int = 2, num_classes: int = 2,
                     noise: float = 0.0) -> None:
    if not shape or any(d < 1 for d in shape):
        fail("data.shape", list(shape), "a list of positive sizes, e.g. [1,28,28] or [8]")
    if num_samples < 2:
        fail("data.num_samples", num_samples, "must be >= 2")
    if num_classes < 2:
        fail("data.num_classes", num_classes, "must be >= 2")
    if not (noise >= 0 and math.isfinite(noise)):
        fail("data.noise", noise, "must be >= 0")


synthetic.dtrain_task = "classification"
regression.dtrain_task = "regression"
synthetic.dtrain_check = regression.dtrain_check = lambda cfg: _check_generated(cfg, **cfg.kwargs)


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
    if all(is_number(name) for name in header):
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


def is_number(cell: str) -> bool:
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
            if not is_number(cell):
                what = "is empty" if not cell else f"holds {cell[:40]!r}, not a finite number"
                raise DataError(f"{path}: data row {i + 1}, column {names[j]!r} {what}; feature and regression "
                                "target columns must be numbers (fill or drop missing values)")
            out[i, j] = float(cell)
    return torch.from_numpy(out).float()


def csv_table(path: Optional[str] = None, target: Optional[str] = None, features: Optional[list[str]] = None,
              root: Optional[str] = None, *, options: DataConfig, world: w.World) -> Splits:
    """A table from data.path: data.target is predicted from data.features (or every other column), as
    regression or classification (data.task; class labels may be any text); features standardised.
    `root` only lends its folder to data.path (`${data.root}/table.csv`)."""
    cfg, path = options, Path(path).expanduser()
    header, rows = read_table(path)
    features = list(features) if features is not None else [c for c in header if c != target]
    missing = [c for c in [target, *features] if c not in header]
    if missing:
        raise DataError(f"{path} has no column {', '.join(map(repr, missing))} (data.target, data.features); "
                        f"its columns are {', '.join(header)}")
    if not features:
        raise DataError(f"{path} has no column besides data.target={target!r} to learn from")
    x = table_columns(path, header, rows, features)
    y, out, classes = tasks.get(cfg.task).table_targets(path, header, rows, target)
    if len(rows) < 3:
        raise DataError(f"{path} has {len(rows)} row(s): too few for training, validation and test splits")
    return tensor_splits(cfg, x, y, cfg.task, out, standardize=cfg.normalize, class_names=classes,
                          features=features, target=target)


def _check_csv(cfg: DataConfig, path: Optional[str] = None, target: Optional[str] = None,
               features: Optional[list[str]] = None, root: Optional[str] = None) -> None:
    """data=csv needs a file, a target column and a task."""
    if not path:
        fail("data.path", path, "data=csv needs the path of a CSV file with a header row")
    if not target:
        fail("data.target", target, "data=csv needs the name of the column to predict")
    if cfg.task is None:
        fail("data.task", None, "data=csv needs regression or classification")
    if features is not None and (not features or target in features):
        fail("data.features", features, "the feature columns: a non-empty list without data.target "
             "(null: every column but the target)")


csv_table.dtrain_check = lambda cfg: _check_csv(cfg, **cfg.kwargs)
