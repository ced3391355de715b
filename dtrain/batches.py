"""Batches as research code shapes them: a tensor, a tuple or list, a dict, any nesting of these (numbers and
strings ride along untouched). Every tensor leaf moves to the device; a batch's sample count is the first
dimension of its first tensor leaf. A model without its own step gets `(inputs, target)` batches and is called
`model(**inputs)` for a dict, `model(*inputs)` for a tuple or list, `model(inputs)` for a tensor."""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
from torch import nn


def to_device(batch: Any, device: torch.device, memory_format: torch.memory_format = torch.preserve_format) -> Any:
    """`batch` with every tensor leaf on `device` (4-D tensors in `memory_format`)."""
    if isinstance(batch, torch.Tensor):
        if batch.ndim == 4 and memory_format is not torch.preserve_format:
            return batch.to(device, non_blocking=True, memory_format=memory_format)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device, memory_format) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [to_device(v, device, memory_format) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)  # a namedtuple too
    return batch


def leaves(batch: Any) -> Iterator[torch.Tensor]:
    """The tensor leaves of `batch`, depth first, in order."""
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, dict):
        for v in batch.values():
            yield from leaves(v)
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            yield from leaves(v)


def first_tensor(batch: Any) -> Optional[torch.Tensor]:
    return next(leaves(batch), None)


def count(batch: Any) -> int:
    """How many samples a batch holds: the first dimension of its first tensor leaf."""
    first = first_tensor(batch)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def pair(batch: Any) -> tuple[Any, Any]:
    """A model without its own step trains on `(inputs, target)` batches."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    from dtrain.errors import ContractError
    raise ContractError(f"a batch is a {type(batch).__name__}, not an (inputs, target) pair: a model without its own "
                        "training_step(self, batch) trains on (inputs, target) items; define training_step to take "
                        "the batch as it is")


def call(model: nn.Module, inputs: Any) -> Any:
    """The model on its inputs: keyword arguments from a dict, positional ones from a tuple or list."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    return model(inputs)
