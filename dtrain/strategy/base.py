"""The Strategy interface (see dtrain.strategy)."""

from __future__ import annotations

import contextlib
from typing import ContextManager, Iterable

import torch
from torch import nn

from dtrain import world as w


class Strategy:
    """One process's part in training a model: the defaults are those of a model every rank holds whole."""

    name = "single"

    def __init__(self, world: w.World):
        self.world = world

    def setup(self, model: nn.Module) -> nn.Module:
        """The module the loop calls forward on (wrapped for the world); `model` stays the plain module."""
        return model

    def no_sync(self, net: nn.Module, sync: bool) -> ContextManager:
        """Around a micro-batch's forward and backward: with sync=False, gradients accumulate locally
        (the step's last micro-batch reduces them all)."""
        return contextlib.nullcontext()

    def clip_grad_norm(self, parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm (over every rank's part of the gradients) to `max_norm`."""
        return nn.utils.clip_grad_norm_(list(parameters), max_norm)

    def sync_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics), so all evaluate and save one model."""
        w.broadcast_buffers(model)

    # -- state, as the Checkpointer reads and writes it ----------------------------------------------

    def model_state_dict(self, model: nn.Module) -> dict:
        return model.state_dict()

    def load_model_state_dict(self, model: nn.Module, state: dict) -> None:
        model.load_state_dict(state, strict=True)

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)
