"""Exporting a trained model: ONNX (checked in onnxruntime), TorchScript (reloaded and checked) or its plain
state_dict, never over a file of the user's. `python -m dtrain.export` is its command line, documented there."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import torch

from dtrain.errors import BadInput, ConfigError

FORMATS = ("onnx", "torchscript", "state_dict")
TOLERANCE = 1e-3
ONNX_SINGLE_FILE_BYTES = 2**31 - 2**27  # protobuf's 2 GB limit, less room for the graph itself


def example_batch(model, n: int = 8) -> torch.Tensor:
    """A preprocessed batch of validation inputs, or random inputs where the data cannot be read."""
    from dtrain import data
    from dtrain import world as w
    try:
        val = data.build(model.config.data, w.World()).val
        return torch.stack([val[i][0] for i in range(min(n, len(val)))]).to(model.device)
    except Exception:  # the data set is not here (exported on another machine): shapes are what matters
        return torch.randn(n, *model.info["shape"], device=model.device)


def export(model, fmt: str, out: Path, overwrite: bool = False) -> dict:
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r} is not allowed: choose one of {', '.join(FORMATS)}")
    if not out.parent.is_dir():
        raise BadInput(f"out={out}: the folder {out.parent} does not exist")
    side_file = fmt == "onnx" and weight_bytes(model.net) > ONNX_SINGLE_FILE_BYTES
    writes = [out, out.with_name(out.name + ".json"), *([out.with_name(out.name + ".data")] if side_file else [])]
    for path in writes:
        if path.exists() and not overwrite:
            raise BadInput(f"{path} exists; choose another out= or set overwrite=true")
    net, x = model.net.eval(), example_batch(model)
    with torch.no_grad():
        expected = net(x).float().cpu()
    result = {"format": fmt, "out": str(out), "batch": len(x), "files": [str(p) for p in writes]}
    if fmt == "state_dict":
        torch.save(net.state_dict(), out)
    elif fmt == "torchscript":
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export, yet still asked for
            torch.jit.trace(net, x).save(str(out))
            got = torch.jit.load(str(out), map_location=model.device)(x[:3]).float().cpu()
        result["max_abs_diff"] = float((got - expected[:3]).abs().max())
    else:
        result["max_abs_diff"] = _onnx(net, x, out, expected, side_file)
    if result.get("max_abs_diff", 0) > TOLERANCE:
        raise RuntimeError(f"the exported {fmt} model differs from PyTorch by {result['max_abs_diff']:.2e} "
                           f"(> {TOLERANCE}); {out} was written but should not be used")
    (out.with_name(out.name + ".json")).write_text(json.dumps(
        {"model": model.config.model.name, "input": model.info, "exported_from": model.ckpt}, indent=2) + "\n")
    return result


def weight_bytes(net: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*net.parameters(), *net.buffers()))


def _onnx(net: torch.nn.Module, x: torch.Tensor, out: Path, expected: torch.Tensor, side_file: bool) -> float:
    try:
        import onnxruntime
    except ImportError:
        raise BadInput("format=onnx needs onnx, onnxscript and onnxruntime: pip install 'dtrain[export]'") from None
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(out), input_names=["input"], output_names=["output"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, external_data=side_file)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    odd = x[:3].cpu().numpy()  # another batch size than the one traced: the batch dimension is dynamic
    got = torch.from_numpy(session.run(None, {"input": odd})[0])
    return float((got - expected[:3]).abs().max())
