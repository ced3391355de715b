"""Export a trained model: `python -m dtrain.export ckpt=PATH format=onnx|torchscript|state_dict out=PATH`.

- onnx: opset 18 via torch.export, with a dynamic batch dimension (input "input", output "output"). After
  writing, the file is loaded in onnxruntime and its outputs compared with PyTorch's on a real batch (the
  validation data where it can be read, else random inputs); the largest difference is printed, and an
  export that differs by more than 1e-3 fails. A model under 2 GB is one self-contained .onnx file; a
  larger one (beyond protobuf's 2 GB limit) keeps its weights beside it in PATH.data, named on the last line.
- torchscript: torch.jit.trace; loaded back and checked the same way.
- state_dict: the plain model weights (`torch.save(model.state_dict())`), which load with
  `model.load_state_dict(torch.load(PATH))` into the model class, no dtrain trainer state.
The input the exported model takes is the preprocessed one (normalised floats); the preprocessing itself
(mean, std, shape, classes) is written beside it as PATH.json. An existing `out` is never overwritten
unless overwrite=true: every file an export would write is checked before any is written.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dtrain import app
from dtrain.exporting import TOLERANCE, export


def run(args: dict) -> None:
    from dtrain.inference import load_model
    result = export(load_model(args["ckpt"]), args["format"], Path(args["out"]), args["overwrite"])
    runtime = {"onnx": "onnxruntime", "torchscript": "the reloaded TorchScript"}.get(result["format"])
    check = f"; {runtime} output within {result['max_abs_diff']:.1e} of PyTorch's on a batch of " \
            f"{result['batch']} (tolerance {TOLERANCE:g})" if runtime else ""
    weights = f"; its weights in {result['out']}.data (keep it beside the .onnx file)" \
        if f"{result['out']}.data" in result["files"] else ""
    print(f"wrote {result['out']} ({result['format']}){check}; its preprocessing in {result['out']}.json{weights}")


def main(argv: list[str] | None = None) -> int:
    return app.key_value_main(__doc__, {"ckpt": None, "format": None, "out": None, "overwrite": False}, run, argv)


if __name__ == "__main__":
    sys.exit(main())
