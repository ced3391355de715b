"""Predict with a trained model: `python -m dtrain.predict ckpt=PATH input=PATH [topk=5] [out=FILE.csv]`.

`input` is an image file, a folder of images (every .png/.jpg/... in it, sorted), a .npy / .pt tensor
file holding one input or a batch ([N, *shape]; uint8 pixels, or floats in 0..1 for images), or, for a
model trained on data=csv, a CSV file with the training features as named columns (others are ignored).
The preprocessing is the one the model was trained with, read from the checkpoint (channels, size,
resize, normalisation, the features' standardisation), never re-typed. Prints the top-k classes with
their probabilities (or the predicted values for regression); for a folder, or with out=, also writes a
CSV (never over an existing file).
"""

from __future__ import annotations

import sys
from pathlib import Path

from dtrain import app
from dtrain.predicting import check_out, predict, write_csv


def run(args: dict) -> None:
    from dtrain.inference import load_model
    out = args["out"] or ("predictions.csv" if Path(args["input"]).is_dir() else "")
    if out:
        check_out(Path(out))
    rows = predict(load_model(args["ckpt"], args["device"]), Path(args["input"]), args["topk"])
    for r in rows:
        shown = ", ".join(f"{c} {p:.4f}" for c, p in r["top"]) if "top" in r else \
            ", ".join(f"{v:.6g}" for v in r["prediction"])
        print(f"{r['input']}: {shown}")
    if out:
        write_csv(rows, Path(out))
        print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    return app.key_value_main(__doc__, {"ckpt": None, "input": None, "topk": 5, "out": "", "device": "cpu"},
                              run, argv)


if __name__ == "__main__":
    sys.exit(main())
