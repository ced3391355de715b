"""How fast and how big training runs: model FLOPs counted once from one forward pass (for FLOP/s and model
FLOP utilisation against the GPU's peak; reported by dtrain.callbacks.Throughput), TF32, memory format,
activation checkpointing."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from dtrain.errors import ConfigError

# The metrics that measure speed, not learning: they differ between two otherwise identical runs.
TIMINGS = ("epoch_time_s", "wall_time_s", "samples_per_sec", "step_time_s", "flops_per_sec", "mfu",
           "checkpoint_stall_s")

# Dense peak FLOP/s per GPU from the vendors' data sheets: (bf16/fp16 tensor cores, fp32).
PEAK_FLOPS = {
    "H200": (989e12, 67e12),
    "H100 NVL": (835e12, 60e12),
    "H100 PCIe": (756e12, 51e12),
    "H100": (989e12, 67e12),  # SXM: "NVIDIA H100 80GB HBM3"
    "A100": (312e12, 19.5e12),
    "L40S": (362e12, 91.6e12),
    "L4": (121e12, 30.3e12),
    "A10": (125e12, 31.2e12),
    "V100": (125e12, 15.7e12),
    "T4": (65e12, 8.1e12),
}


@torch.no_grad()
def training_flops_per_sample(model: nn.Module, example: Optional[torch.Tensor], device: torch.device) -> Optional[int]:
    """FLOPs to train on one sample: a counted forward pass of `example` (one input, batch of 1) times 3 (the
    backward pass costs about two forwards). Counted in eval mode so BatchNorm's running statistics are
    untouched; None without an example or if an operator cannot be counted. PyTorch's counter has no formula
    for the CPU's attention kernel (scaled_dot_product_attention counts 0 there; on CUDA and on the meta
    device it counts)."""
    from torch.utils.flop_counter import FlopCounterMode
    if example is None:
        return None
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            model(example.to(device))
        return 3 * counter.get_total_flops() or None
    except Exception:
        return None
    finally:
        model.train(was_training)


def example_input(shape: tuple[int, ...], dtype: Optional[str]) -> Optional[torch.Tensor]:
    """Zeros shaped and typed as one input (batch of 1; `dtype` a data set's input dtype name, token ids
    stay integers), to count FLOPs with; None for inputs without one shape (dicts)."""
    return torch.zeros(1, *shape, dtype=getattr(torch, dtype or "float32")) if shape else None


def peak_flops(device: torch.device, low_precision: bool) -> Optional[float]:
    """This GPU's dense peak FLOP/s for the precision trained in, if its name is in PEAK_FLOPS."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, single) in PEAK_FLOPS.items():  # ordered so the most specific name matches first
        if key in name:
            return half if low_precision else single
    return None


def set_tf32(enabled: bool) -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions on CUDA (about 8x the fp32 rate on Ampere and
    later, with a 10-bit mantissa), or full fp32."""
    value = "tf32" if enabled else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # PyTorch >= 2.9; the old flags are deprecated
        torch.backends.cuda.matmul.fp32_precision = value
        torch.backends.cudnn.conv.fp32_precision = value
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled


def memory_format(channels_last: bool, shape: tuple[int, ...]) -> torch.memory_format:
    """NHWC for trainer.channels_last=true (image data only), else whatever a tensor has."""
    if not channels_last:
        return torch.preserve_format
    if len(shape) != 3:
        raise ConfigError(f"trainer.channels_last=true needs image data (C x H x W), not shape {list(shape)}; "
                          "set trainer.channels_last=false")
    return torch.channels_last


def checkpoint_activations(model: nn.Module, blocks: tuple[str, ...] | list[str]) -> None:
    """trainer.activation_checkpointing: each block (a submodule of a class in `blocks`; none: the whole
    model) keeps only its input in the forward and recomputes its activations in the backward. The
    composable form leaves parameter names (and so checkpoints) as they were."""
    from torch.distributed._composable import checkpoint

    from dtrain.models import blocks_of
    for module in blocks_of(model, blocks) or [model]:
        checkpoint(module)


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t  # a sharded parameter: this rank's shard
    return local.numel() * local.element_size()


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds of the model's parameters, their gradients (one per trainable parameter, in
    its dtype, whether or not it exists right now) and the optimizer's state."""
    params = list(model.parameters())
    held = {"parameters": sum(_local_bytes(p) for p in params),
            "gradients": sum(_local_bytes(p) for p in params if p.requires_grad),
            "optimizer": sum(_local_bytes(v) for s in optimizer.state.values() for v in s.values()
                             if isinstance(v, torch.Tensor))}
    return {**held, "total": sum(held.values())}


def peak_rss_bytes() -> int:
    """This process's peak resident memory: Linux's VmHWM, which is this process's own (getrusage's ru_maxrss
    survives exec, so a run started from a larger process would report that process's peak); elsewhere
    ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError, IndexError):
        import resource
        import sys
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
