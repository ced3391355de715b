"""Plots of a run, drawn from its folder's files alone (headless, PNG), and a comparison of several runs.

    python -m dtrain.plots redraw RUN [RUN ...]               curves.png, confusion.png, samples.png in each
    python -m dtrain.plots compare RUN RUN [...] -o FILE.png  the runs' validation curves in one figure

A training run draws them at its end (logger.plots=true) from metrics.jsonl, confusion.json and samples.npz.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from dtrain import files
from dtrain.rundir import CONFUSION, METRICS, SAMPLES, SUMMARY
from dtrain.errors import EXIT_BAD_INPUT, BadInput

DPI = 100
SIZES = {"curves.png": (14, 4), "confusion.png": (6, 5), "samples.png": (8, 8.5), "compare": (12, 4)}  # inches


class PlotError(BadInput):
    pass


def _figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=size, dpi=DPI)  # no pyplot: no display, no global state
    FigureCanvasAgg(fig)
    return fig


def _epochs(folder: Path) -> list[dict]:
    path = folder / METRICS
    if not path.exists():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise PlotError(f"{path} is not JSON lines ({e}); it is not a dtrain metrics file") from e


def _series(epochs: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(e["epoch"], e[key]) for e in epochs if e.get(key) is not None]  # counted from 1
    return [p[0] for p in points], [p[1] for p in points]


def _title(folder: Path) -> str:
    """config name (run id), from summary.json where the run finished."""
    try:
        return f"{json.loads((folder / SUMMARY).read_text())['config_name']} ({folder.name})"
    except (OSError, ValueError, KeyError):
        return folder.name


def curves(folder: Path, out: Path) -> bool:
    """Loss and the task's other metrics per epoch (train vs val; validation-only metrics such as F1 and
    AUC share one panel), and the learning rate."""
    epochs = _epochs(folder)
    if not epochs:
        return False
    metrics = [k.removeprefix("val_") for k in epochs[-1] if k.startswith("val_")]
    paired = [m for m in metrics if f"train_{m}" in epochs[-1]]
    alone = [m for m in metrics if m not in paired]
    fig = _figure(SIZES["curves.png"])
    axes = fig.subplots(1, len(paired) + bool(alone) + 1)
    panels = [(name, [(split, f"{split}_{name}") for split in ("train", "val")]) for name in paired]
    if alone:
        panels.append((f"validation {', '.join(alone)}", [(name, f"val_{name}") for name in alone]))
    for ax, (title, lines) in zip(axes, panels):
        for label, key in lines:
            ax.plot(*_series(epochs, key), marker="o", label=label)
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend()
        ax.grid(alpha=0.3)
    ax = axes[-1]
    ax.plot(*_series(epochs, "lr"), marker="o")
    ax.set(title="learning rate (end of epoch)", xlabel="epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    fig.suptitle(_title(folder))
    fig.tight_layout()
    _save(fig, out)
    return True


def confusion(folder: Path, out: Path) -> bool:
    path = folder / CONFUSION
    if not path.exists():
        return False
    record = json.loads(path.read_text())
    matrix, names = np.array(record["matrix"]), record["classes"]
    fig = _figure(SIZES["confusion.png"])
    ax = fig.subplots()
    rows = np.maximum(matrix.sum(1, keepdims=True), 1)
    image = ax.imshow(matrix / rows, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true class")
    ticks = range(len(names))
    ax.set_xticks(ticks, names, rotation=45 if max(map(len, names)) > 2 else 0)
    ax.set_yticks(ticks, names)
    if len(names) <= 20:
        for i in ticks:
            for j in ticks:
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] > 0.5 * rows[i, 0] else "black")
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    ax.set(xlabel="predicted", ylabel="true", title=f"validation confusion matrix (accuracy {accuracy:.4f})")
    fig.tight_layout()
    _save(fig, out)
    return True


def _save(fig, out: Path) -> None:
    """Written whole or not at all (files.atomic_write); a refused write raises."""
    files.atomic_write(out, lambda f: fig.savefig(f, format=out.suffix.removeprefix(".") or "png"))


def save_samples(path: Path, images: np.ndarray, labels: np.ndarray, predicted: np.ndarray,
                 classes: Optional[list[str]] = None) -> None:
    # a file object: np.savez would add .npz to a name without it
    files.atomic_write(path, lambda f: np.savez(f, images=images, labels=labels, predicted=predicted,
                                                 classes=np.array(classes or [])))


def samples(folder: Path, out: Path) -> bool:
    """A grid of validation images titled true/predicted, wrong predictions in red (the tutorials' view)."""
    path = folder / SAMPLES
    if not path.exists():
        return False
    with np.load(path) as f:
        images, labels, predicted, classes = f["images"], f["labels"], f["predicted"], list(f["classes"])
    name = (lambda i: str(classes[i])) if classes else str
    fig = _figure(SIZES["samples.png"])
    side = int(np.ceil(np.sqrt(len(images))))
    axes = fig.subplots(side, side, squeeze=False).ravel()
    for ax, image, true, guess in zip(axes, images, labels, predicted):
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None)
        ax.set_title(f"{name(true)} / {name(guess)}", color="black" if true == guess else "red", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle("validation samples: true / predicted")
    fig.tight_layout()
    _save(fig, out)
    return True


PLOTS = {"curves.png": curves, "confusion.png": confusion, "samples.png": samples}


def draw_one(folder: Path, name: str) -> bool:
    return PLOTS[name](Path(folder), Path(folder) / name)


def redraw(folder: Path) -> list[Path]:
    """Every plot the run folder has data for; the paths written."""
    folder = Path(folder)
    if not (folder / METRICS).exists() and not (folder / CONFUSION).exists():
        raise PlotError(f"{folder} is not a dtrain run folder with results (no metrics.jsonl); give a run "
                        "folder such as runs/<name>/<id>")
    return [folder / name for name in PLOTS if draw_one(folder, name)]


def compare(folders: list[Path], out: Path) -> Path:
    """The runs' validation loss and other validation metrics per epoch, one line per run."""
    runs = {Path(f): _epochs(Path(f)) for f in folders}
    empty = [str(f) for f, e in runs.items() if not e]
    if empty:
        raise PlotError(f"no metrics.jsonl with epochs in {', '.join(empty)}; give run folders that trained")
    metrics = list(dict.fromkeys(k for e in runs.values() for k in e[-1] if k.startswith("val_")))
    fig = _figure(SIZES["compare"])
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    labels = _short_labels(list(runs))
    for ax, key in zip(axes, metrics):
        for (folder, epochs), label in zip(runs.items(), labels):
            ax.plot(*_series(epochs, key), marker="o", label=label)
        ax.set(title=key, xlabel="epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out)
    return out


def _short_labels(folders: list[Path]) -> list[str]:
    """Each folder named by the last two parts of its path (runs/<name>/<id> -> <name>/<id>)."""
    return ["/".join(f.resolve().parts[-2:]) for f in folders]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dtrain.plots", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("redraw", help="draw a run folder's plots again from its files")
    p.add_argument("runs", nargs="+", type=Path)
    p = sub.add_parser("compare", help="several runs' validation curves in one figure")
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("-o", "--out", type=Path, default=Path("compare.png"))
    args = parser.parse_args(argv)
    try:
        if args.command == "redraw":
            for folder in args.runs:
                print("\n".join(map(str, redraw(folder))))
        else:
            print(compare(args.runs, args.out))
    except (BadInput, OSError) as e:
        print(f"dtrain.plots: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
