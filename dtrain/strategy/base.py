"""The Strategy interface (see dtrain.strategy)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import ContextManager, Iterable

import torch
from torch import nn

from dtrain import dcp, models, optim
from dtrain import world as w


class Strategy:
    """One process's part in training a model: the defaults are those of a model every rank holds whole."""

    name = "single"
    lockstep_forward = False  # True: every forward is a collective, so ranks must run the same number

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

    def state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """The model's and optimizer's full state, for a checkpoint file (every rank calls it)."""
        return {"model": self.model_state_dict(model), "optimizer": self.optimizer_state_dict(model, optimizer)}

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, name: str) -> None:
        """A loaded checkpoint's model and optimizer into this layout: a file's full state dicts, or a
        distributed checkpoint's shards, resharded to this world and strategy."""
        if "dcp" in state:
            dcp.read_into(Path(state["dcp"]), model, optimizer)
            return
        self.load_model_state_dict(model, models.upgrade(name, state["model"]))
        self.load_optimizer_state_dict(model, optimizer, optim.own_implementation(optimizer, state["optimizer"]))

    def model_state_dict(self, model: nn.Module) -> dict:
        return model.state_dict()

    def load_model_state_dict(self, model: nn.Module, state: dict) -> None:
        model.load_state_dict(state, strict=True)

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Keyed by parameter names (not positions), so every strategy reads what another saved."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, by_name(model, optimizer, state),
                                 options=StateDictOptions(full_state_dict=True))


def by_name(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """An optimizer state dict keyed by parameter names; one keyed by positions (PyTorch's own, as
    checkpoints before dtrain's strategies hold) is renamed, position i being the i-th parameter of the
    optimizer's groups."""
    if not state.get("state") or not all(isinstance(k, int) for k in state["state"]):
        return state
    names = {p: n for n, p in model.named_parameters()}
    ordered = [names[p] for group in optimizer.param_groups for p in group["params"]]
    return {"state": {ordered[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [ordered[i] for i in g["params"]]} for g in state["param_groups"]]}
