"""Train every tutorial experiment (conf/experiment/*_tutorial.yaml) on the data this machine has and print
the README's "From the tutorials" table: what each reaches, in how long.

    python benchmarks/tutorials.py [--data-root DIR] [--boston FILE] [--epochs N]

- MNIST tutorials train on full MNIST when DIR/MNIST/raw/ holds it, else on the bundled sample
  (data=mnist_sample: 9,000 train / 1,000 val of the official test images).
- CIFAR-10 tutorials need DIR/cifar-10-batches-py/; without it they are listed as not run.
- The Boston-housing tutorial needs --boston: a CSV with the header CRIM,...,LSTAT,MEDV, or the headerless
  14-column file of UCI (as the PyPI package mlxtend ships it in mlxtend/data/data/boston_housing.csv), to
  which a temporary copy adds the header.
Each job runs in this process through dtrain.api.train with the experiment's own recipe; --epochs
shortens them all (the table then says so).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from dtrain import api

BOSTON = "CRIM,ZN,INDUS,CHAS,NOX,RM,AGE,DIS,RAD,TAX,PTRATIO,B,LSTAT,MEDV"
JOBS = [  # (experiment, what it reproduces)
    ("mnist_mlp_tutorial", "MNIST SimpleNet (784-128-10, SGD 0.01)"),
    ("mnist_mlp3_tutorial", "MNIST 3-layer Net (Adam 1e-3)"),
    ("mnist_mlp3_sgd_tutorial", "MNIST 3-layer Net (SGD 0.01, momentum 0.9)"),
    ("cifar10_lenet_tutorial", "CIFAR-10 LeNet (SGD 0.001, momentum 0.9)"),
    ("cifar10_convnet_tutorial", "CIFAR-10 CNN without BatchNorm (Adam 1e-3)"),
    ("csv_linear_boston_tutorial", "Boston-housing linear regression (SGD 0.01, 100 epochs)"),
]


def boston_with_header(path: Path, folder: Path) -> Path:
    first = path.read_text().splitlines()[0]
    if first.replace(" ", "").upper().startswith("CRIM"):
        return path
    copy = folder / "boston_housing.csv"
    copy.write_text(BOSTON + "\n" + path.read_text())
    return copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("data"))
    parser.add_argument("--boston", type=Path)
    parser.add_argument("--epochs", type=int, default=0, help="0: each experiment's own")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dtrain-tutorials-"))
    rows = []
    for name, what in JOBS:
        extra, data = [], ""
        if name.startswith("mnist"):
            if (args.data_root / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
                extra, data = [f"data.root={args.data_root}"], "MNIST (60,000 train)"
            else:
                extra, data = ["data=mnist_sample"], "bundled MNIST sample (9,000 train / 1,000 val)"
        elif name.startswith("cifar10"):
            if not (args.data_root / "cifar-10-batches-py").is_dir():
                rows.append((what, name, "not here (no CIFAR-10 offline)", "-", "-", "-"))
                continue
            extra, data = [f"data.root={args.data_root}"], "CIFAR-10 (45,000 train / 5,000 val / 10,000 test)"
        elif args.boston:
            extra, data = [f"data.path={boston_with_header(args.boston, work)}"], f"{args.boston.name} (506 rows)"
        else:
            rows.append((what, name, "not here (give --boston FILE)", "-", "-", "-"))
            continue
        if args.epochs:
            extra.append(f"trainer.epochs={args.epochs}")
        start = time.perf_counter()
        s = api.train(f"experiment={name}", *extra, f"hydra.run.dir={work / name}", "logger.plots=false",
                      "logger.console=false", "logger.progress_bar=false", "checkpoint.enabled=false")
        took = time.perf_counter() - start
        if "val_acc" in s:
            result = f"val acc {s['val_acc']:.4f}" + (f", test acc {s['test_acc']:.4f}" if "test_acc" in s else "")
            extra_metrics = f"val F1 {s['val_f1']:.4f}, AUC {s['val_auc']:.4f}"
        else:
            result = f"test MSE {s['test_loss']:.2f} (RMSE {s['test_loss'] ** 0.5:.2f})"
            extra_metrics = f"val MSE {s['val_loss']:.2f}"
        rows.append((what, name, data, f"{s['epochs']}", f"{result}; {extra_metrics}", f"{took:.0f} s"))
    header = ("tutorial", "experiment", "data", "epochs", "reaches", "time")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for what, name, data, epochs, result, took in rows:
        print(f"| {what} | `experiment={name}` | {data} | {epochs} | {result} | {took} |")


if __name__ == "__main__":
    main()
