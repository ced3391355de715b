"""DistributedDataParallel: every rank holds the whole model; DDP all-reduces gradients during backward."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, ContextManager

from torch import nn

from dtrain.errors import ConfigError
from dtrain.steps import has_own_step
from dtrain.strategy.base import Strategy

# dist.* keys that are DistributedDataParallel's own options, passed through with PyTorch's defaults
DDP_OPTIONS = ("bucket_cap_mb", "gradient_as_bucket_view", "static_graph", "find_unused_parameters",
               "broadcast_buffers")


class _DDP(nn.parallel.DistributedDataParallel):
    """DDP whose complaint about parameters without gradients names dtrain's option."""

    def forward(self, *args, **kwargs):
        try:
            return super().forward(*args, **kwargs)
        except RuntimeError as e:
            if "find_unused_parameters" not in str(e):
                raise
            raise ConfigError("the model has parameters that received no gradient in the last step "
                              "(DistributedDataParallel cannot finish its gradient reduction); set "
                              "dist.find_unused_parameters=true, or make every parameter take part in the loss") from e


class StepDispatch(nn.Module):
    """The user's model, whose forward runs one of its methods by name: what DDP wraps when the model has its own
    training_step, so DDP's gradient hooks fire for it exactly as for forward (as Lightning's wrapper does)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, name: str, *args, **kwargs):
        return getattr(self.model, name)(*args, **kwargs)


class DDP(Strategy):
    name = "ddp"
    describe = "DistributedDataParallel"
    needs_group = True
    options = {"model.sync_batchnorm": False, "dist.find_unused_parameters": False, "dist.static_graph": False,
               "dist.gradient_as_bucket_view": False, "dist.bucket_cap_mb": 25.0, "dist.broadcast_buffers": True}

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.cfg.model.sync_batchnorm:
            if self.world.device.type != "cuda":
                raise ConfigError("model.sync_batchnorm=true needs CUDA devices (PyTorch's SyncBatchNorm has no "
                                  "CPU implementation); set model.sync_batchnorm=false on CPU")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        options = {k: v for k, v in dataclasses.asdict(self.cfg.dist).items() if k in DDP_OPTIONS}
        if "forward_sync_buffers" in inspect.signature(_DDP.__init__).parameters:
            options["forward_sync_buffers"] = options.pop("broadcast_buffers")  # its name since PyTorch 2.12
        device_ids = [self.world.device.index] if self.world.device.type == "cuda" else None
        return _DDP(StepDispatch(model) if has_own_step(model) else model, device_ids=device_ids, **options)

    def method(self, net: nn.Module, model: nn.Module, name: str) -> Callable[..., Any]:
        if name == "forward" or not isinstance(net.module, StepDispatch):
            return super().method(net, model, name)
        return functools.partial(net, name)

    def no_sync(self, net: nn.Module, sync: bool) -> ContextManager:
        return super().no_sync(net, sync) if sync else net.no_sync()
