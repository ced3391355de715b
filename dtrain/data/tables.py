"""Feature data: random synthetic classification and regression sets, and tables read from CSV files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from dtrain import world as w
from dtrain.config import DataConfig
from dtrain.data.core import Splits, tensor_splits
from dtrain.errors import DataError

def synthetic(cfg: DataConfig, world: w.World) -> Splits:
    """Random inputs of any shape whose labels a fixed random linear map decides (so they are learnable)."""
    g = torch.Generator().manual_seed(cfg.split_seed)
    n, shape = cfg.num_samples, tuple(cfg.shape)
    x = torch.randn(n, *shape, generator=g)
    proj = torch.randn(math.prod(shape), cfg.num_classes, generator=g)
    y = (x.flatten(1) @ proj).argmax(1)
    return tensor_splits(cfg, x, y, "classification", cfg.num_classes)


def regression(cfg: DataConfig, world: w.World) -> Splits:
    """y = x . coef + bias + noise, with coefficients fixed by data.split_seed (see `regression_truth`)."""
    coef, bias = regression_truth(cfg)
    g = torch.Generator().manual_seed(cfg.split_seed + 1)
    x = torch.randn(cfg.num_samples, *cfg.shape, generator=g)
    y = x.flatten(1) @ coef + bias + cfg.noise * torch.randn(cfg.num_samples, 1, generator=g)
    return tensor_splits(cfg, x, y, "regression", 1)


def regression_truth(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.split_seed)
    return torch.randn(math.prod(cfg.shape), 1, generator=g), torch.randn(1, generator=g)


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
    return tensor_splits(cfg, x, y, cfg.task.value, out, standardize=cfg.normalize, class_names=classes,
                          features=features, target=cfg.target)
