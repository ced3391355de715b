"""What dtrain asks of a user's model, loss, metrics and callbacks, checked once where it can be seen (the
first training batch; a callback's state when the run starts and at every save), so that a broken
contract is one line naming the part and the contract, before an epoch is spent on it, never a
traceback from deep inside PyTorch."""

from __future__ import annotations

import io
import pickle
from typing import Any, Callable, Mapping, Optional

import torch

from dtrain.errors import ContractError


def _named(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def check_outputs(model: torch.nn.Module, out: Any, y: torch.Tensor,
                  problem: Callable[[torch.Tensor, torch.Tensor, int], Optional[str]], classes: int) -> None:
    """A model without its own step returns one tensor that fits the task (`problem`: the task's check)."""
    if not isinstance(out, torch.Tensor):
        raise ContractError(f"model: {type(model).__name__}.forward returned a {type(out).__name__}; dtrain's "
                            "step needs one tensor of outputs from it (return the outputs alone)")
    found = problem(out.detach(), y, classes)
    if found:
        raise ContractError(f"model: {type(model).__name__}: {found}")


def check_loss(loss: Any, fn: Any, given: bool, who: Optional[str] = None) -> None:
    """The loss of the first batch is a scalar tensor that backpropagates."""
    who = who or (f"loss: {_named(fn)}" if given else "loss")
    if not isinstance(loss, torch.Tensor):
        raise ContractError(f"{who} returned a {type(loss).__name__}; a loss returns a scalar tensor computed from "
                            "the outputs (not a number: no .item())")
    if loss.ndim != 0:
        raise ContractError(f"{who} returned a tensor of shape {list(loss.shape)}; a loss returns a scalar "
                            "(reduce it, e.g. .mean())")
    if not loss.requires_grad:
        raise ContractError(f"{who} returned a tensor without a gradient (detached, or computed under no_grad); a "
                            "loss must be computed from the model's outputs")


def check_metrics(metrics: Mapping[str, Any], out: torch.Tensor, y: torch.Tensor) -> None:
    """Each extra validation metric runs on the first training batch (a stateful one is reset after), so one
    that raises is named before an epoch is trained."""
    out = out.detach().float()
    for name, metric in metrics.items():
        run_metric(name, lambda: metric.update(out, y) if hasattr(metric, "update") else metric(out, y))
        if hasattr(metric, "reset"):
            metric.reset()


def run_metric(name: str, call: Callable[[], Any]) -> Any:
    """`call()` of the metric `name`; what it raises becomes one line naming it."""
    try:
        return call()
    except Exception as e:
        raise ContractError(f"metrics.{name} raised {type(e).__name__}: {(str(e).splitlines() or [''])[0]}; it is "
                            "given (outputs, targets) of a batch, as the loss is") from e


# What torch.load(weights_only=True) reads back: the checkpoint's rules for a callback's state.
_PLAIN = (torch.Tensor, int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def unsaveable(value: Any, where: str) -> Optional[str]:
    """Where in `value` a checkpoint could not hold it, or None."""
    if isinstance(value, dict):
        for k, v in value.items():
            found = unsaveable(k, f"{where} key") if not isinstance(k, (str, int)) else unsaveable(v, f"{where}[{k!r}]")
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        return next((found for i, v in enumerate(value) if (found := unsaveable(v, f"{where}[{i}]"))), None)
    return None if isinstance(value, _PLAIN) else f"{where} is a {type(value).__module__}.{type(value).__qualname__}"


def check_callback_state(name: str, callback: Any) -> None:
    """A callback's `state_dict()` goes into every checkpoint: it must hold only tensors and plain values, which
    a checkpoint writes and reads back safely (torch.load with weights_only=True). Tried for real (a round
    trip in memory), else a later save would fail or every checkpoint be refused on resume."""
    state = callback.state_dict()
    found = unsaveable(state, "state_dict()")
    if found is None:
        buffer = io.BytesIO()
        try:
            torch.save(state, buffer)
            buffer.seek(0)
            torch.load(buffer, weights_only=True)
        except (pickle.PicklingError, pickle.UnpicklingError, TypeError, AttributeError, RuntimeError) as e:
            found = f"state_dict() cannot be saved ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})"
    if found:
        raise ContractError(f"callbacks.{name}: {type(callback).__name__}.{found}; a callback's state may hold only "
                            "tensors, numbers, strings, None and lists/tuples/dicts of them (a checkpoint must save "
                            "and load it safely)")
