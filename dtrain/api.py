"""dtrain from Python: the functions the command-line entries (`python -m dtrain`, `dtrain.evaluate`,
`dtrain.predict`, `dtrain.export`) are thin layers over, gathered in one place.

    import dtrain
    summary = dtrain.fit(MyNet, my_dataset, overrides=["trainer.epochs=3"])   # your own objects
    summary = dtrain.api.train("model=lenet", "trainer.epochs=2")            # or the command line's overrides
    model = dtrain.load_model(summary["run_dir"] + "/checkpoints/best.pt")
    model.predict(inputs)                                   # raw inputs in, class probabilities (or values) out
    dtrain.evaluate(model.ckpt)["acc"]; dtrain.api.read_metrics(summary["run_dir"])
    dtrain.export(model.ckpt, "onnx", "model.onnx")         # checked in onnxruntime
"""

from __future__ import annotations

from pathlib import Path

from dtrain.inference import Model, build_model, checkpoint_config, evaluate, load_model, read_metrics, read_summary
from dtrain.runs import TrainingFailed, compose, fit, make_config, run_training, train


def export(path: str | Path, format: str, out: str | Path, overwrite: bool = False) -> dict:
    """Write a checkpoint's model as `onnx`, `torchscript` or `state_dict` (the plain weights); the ONNX and
    TorchScript files are loaded back and checked against PyTorch on a real batch. See dtrain.export."""
    from dtrain import exporting
    return exporting.export(load_model(path), format, Path(out), overwrite)


def predict(path: str | Path, inputs: str | Path, topk: int = 5) -> list[dict]:
    """Predictions for an image file, a folder of images, a .npy/.pt tensor file or a CSV table. See
    dtrain.predict."""
    from dtrain import predicting
    return predicting.predict(load_model(path), Path(inputs), topk)


__all__ = ["fit", "train", "build_model", "load_model", "Model", "evaluate", "predict", "export", "read_metrics",
           "read_summary", "make_config", "compose", "checkpoint_config", "run_training", "TrainingFailed"]
