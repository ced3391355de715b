"""The step: how one batch becomes a loss, two ways.

    TaskStep   a model without its own step: (inputs, target) batches, `outputs = model(inputs)`, the task's
               loss (or the user's), the task's sums (dtrain/tasks)
    OwnStep    a model with `training_step(self, batch)` (and perhaps `validation_step`): the batch as it is,
               its loss and other scalars as it returns them (a tensor, or a dict with `loss`), reported as
               train_NAME / val_NAME, each weighted by the batch's sample count

Either way the step runs through the strategy's wrapped module (DDP's gradient hooks and FSDP's unshard and
reshard fire as for forward), under autocast; the loop keeps accumulation, clipping, the stop agreement and
checkpoints. `forward` computes the loss; `keep` counts the batch once the loop has decided to keep the step.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from dtrain import batches, contracts
from dtrain.errors import ContractError
from dtrain.strategy.tensor import whole
from dtrain.tasks import EpochSums, NamedSums, Task


def has_own_step(model: nn.Module) -> bool:
    return callable(getattr(model, "training_step", None))


class TaskStep:
    def __init__(self, call: Callable[[Any], Any], model: nn.Module, task: Task, loss: Callable, custom_loss: bool,
                 metrics: dict, classes: int, device: torch.device, input_format: torch.memory_format):
        self.call, self.model, self.task, self.loss, self.custom_loss = call, model, task, loss, custom_loss
        self.metrics, self.classes, self.device, self.input_format = metrics, classes, device, input_format
        self.sums = EpochSums(task, device)  # this rank's, kept across a mid-epoch resume
        self.checked = False  # whether the first batch's outputs and loss were checked

    def forward(self, batch: Any) -> tuple[torch.Tensor, Any]:
        x, y = batches.pair(batch)
        if isinstance(x, torch.Tensor):  # the common case, without walking the batch
            x = x.to(self.device, non_blocking=True, memory_format=self.input_format)
        else:
            x = batches.to_device(x, self.device, self.input_format)
        y = y.to(self.device, non_blocking=True)
        out = batches.call(self.call, x)
        if not self.checked:  # the first batch: what the model, loss and metrics give fits the task
            contracts.check_outputs(self.model, out, y, self.task.check, self.classes)
        loss = whole(self.loss(out.float(), y))  # split logits (dist.loss_parallel) take the loss as they are,
        out = whole(out.detach())  # and are gathered for the metrics
        if not self.checked:
            contracts.check_metrics(self.metrics, out, y)
            contracts.check_loss(loss, self.loss, self.custom_loss)
            self.checked = True
        return loss, (out, y)

    def keep(self, loss: torch.Tensor, kept: Any) -> None:
        self.sums.add(loss, *kept)


class OwnStep:
    def __init__(self, call: Callable[..., Any], device: torch.device):
        self.call, self.device = call, device  # call(method name, batch) through the wrapped module
        self.sums = NamedSums(device)
        self.checked = False

    def forward(self, batch: Any) -> tuple[torch.Tensor, Any]:
        batch = batches.to_device(batch, self.device)
        loss, logged = unpack(self.call("training_step", batch), "training_step")
        if not self.checked:
            contracts.check_loss(loss, None, False, who="model: training_step")
            self.checked = True
        return loss, (logged, batches.count(batch))

    def keep(self, loss: torch.Tensor, kept: Any) -> None:
        logged, samples = kept
        self.sums.add({"loss": loss, **logged}, samples)


def unpack(result: Any, method: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A step's result: (the loss, the other scalars by name). A tensor is the loss; a dict must hold `loss`."""
    if isinstance(result, torch.Tensor):
        return result, {}
    if isinstance(result, dict) and "loss" in result:
        return result["loss"], scalars({k: v for k, v in result.items() if k != "loss"}, method)
    raise ContractError(f"model: {method} returned a {type(result).__name__}"
                        f"{' without a loss' if isinstance(result, dict) else ''}; it returns the loss (a scalar "
                        "tensor) or a dict with a `loss` tensor and other scalar tensors")


def scalars(values: Any, method: str) -> dict[str, torch.Tensor]:
    """The named scalars a step reports: each a scalar tensor (or a number), the batch's mean."""
    if not isinstance(values, dict):
        raise ContractError(f"model: {method} returned a {type(values).__name__}; it returns a dict of scalar "
                            "tensors, each the batch's mean (reported as val_NAME)")
    out = {}
    for name, value in values.items():
        value = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        if value.numel() != 1:
            raise ContractError(f"model: {method} returned {name!r} of shape {list(value.shape)}; each value is a "
                                "scalar, the batch's mean")
        out[str(name)] = value.reshape(())
    return out


def own_validation(model: nn.Module) -> Optional[str]:
    """Which of the model's methods validation runs: validation_step, else training_step (its loss)."""
    return "validation_step" if callable(getattr(model, "validation_step", None)) else "training_step"
