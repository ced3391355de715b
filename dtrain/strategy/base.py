"""The Strategy interface (see dtrain.strategy): everything that differs between ways of spreading a model
over the process world. The defaults are those of a model every rank holds whole."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Callable, ClassVar, ContextManager, Iterable

import torch
from torch import nn

from dtrain import dcp, models, optim, perf
from dtrain import world as w
from dtrain.config import Config, Precision


class Strategy:
    """One process's part in training a model. Subclasses override what differs; the loop calls only these."""

    name: ClassVar[str] = "single"
    describe: ClassVar[str] = "one process"  # how refusals name it
    needs_group: ClassVar[bool] = False  # True: only with several processes; alone, `Single` trains instead
    lockstep_forward: ClassVar[bool] = False  # True: every forward is a collective, so ranks run as many
    shards_parameters: ClassVar[bool] = False  # parameters are DTensors (which optimizer kernels take them)
    checkpoint_format: ClassVar[str] = "file"  # what checkpoint.format=auto writes: file or dcp
    tensor_parallel: ClassVar[bool] = False  # takes dist.tp > 1 (a 2-D mesh)
    # The keys of its own (key -> default): under another strategy a changed one is refused, never ignored.
    options: ClassVar[dict[str, Any]] = {}

    def __init__(self, cfg: Config, world: w.World):
        self.cfg, self.world = cfg, world
        self.precision = cfg.trainer.precision

    # -- config rules, before anything is built ---------------------------------------------------------

    @classmethod
    def check(cls, cfg: Config, others: Iterable[type["Strategy"]]) -> None:
        """This strategy's own config rules (a subclass adds its own); by default: another strategy's options
        left at their defaults."""
        from dtrain.validate import fail, get
        if cfg.dist.tp != 1 and not cls.tensor_parallel:
            fail("dist.tp", cfg.dist.tp, f"tensor parallelism needs dist.strategy=fsdp (FSDP2 over the data-parallel "
                 f"dimension of a 2-D mesh); {cls.describe} cannot hold tensor-parallel parameters")
        for key in ("tp_plan", "sequence_parallel", "loss_parallel"):
            if getattr(cfg.dist, key) not in (None, False) and cfg.dist.tp == 1:
                fail(f"dist.{key}", getattr(cfg.dist, key), "it splits layers over dist.tp ranks; set dist.tp > 1")
        for other in others:
            for key, default in other.options.items():
                if key not in cls.options and get(cfg, key) != default:
                    fail(key, get(cfg, key), f"an option of {other.describe}; with dist.strategy={cls.name} leave "
                         f"it at its default (it needs dist.strategy={other.name})")

    @classmethod
    def data_parallel_size(cls, cfg: Config, world: w.World) -> int:
        """How many data-parallel ranks share a global batch (what data.batch_size must divide by); a world
        that cannot be laid out as the config asks is one ConfigError."""
        from dtrain.validate import fail
        if cfg.dist.tp < 1 or world.world_size % cfg.dist.tp:
            fail("dist.tp", cfg.dist.tp, f"the {world.world_size} rank(s) must split into groups of dist.tp ranks; "
                 "choose a tp that divides the world size")
        return world.world_size // cfg.dist.tp

    # -- the world as the data sees it --------------------------------------------------------------------

    @property
    def dp(self) -> w.DataParallel:
        """This rank's data-parallel coordinates: samplers, loaders and metric reductions use them."""
        return w.DataParallel(self.world.rank, self.world.world_size)

    @property
    def data_world(self) -> w.World:
        """The world as the loaders see it: this rank's data-parallel rank among the data-parallel ranks."""
        return dataclasses.replace(self.world, rank=self.dp.rank, world_size=self.dp.size)

    # -- the model ------------------------------------------------------------------------------------------

    @property
    def blocks(self) -> tuple[str, ...]:
        """The classes of the model's blocks: what activation checkpointing recomputes (and FSDP shards)."""
        return tuple(self.cfg.model.blocks) if self.cfg.model.blocks is not None else models.blocks(self.cfg.model)

    def setup(self, build: Callable[[], nn.Module], input_format: torch.memory_format) -> tuple[nn.Module, nn.Module]:
        """(the plain module, the module the forward runs on). The model is built and initialised from the
        seed whole (so every strategy and world size starts from the same weights), activation checkpointing
        applied, then it is wrapped for the world."""
        model = build()
        self.checkpoint_activations(model)
        if self.cfg.model.init_from:  # before wrapping, which starts every rank from rank 0's weights
            models.init_from(model, self.cfg.model.name, self.cfg.model.init_from)
        model.to(self.world.device, memory_format=input_format)
        return model, self.wrap(model)

    def checkpoint_activations(self, model: nn.Module) -> None:
        if self.cfg.trainer.activation_checkpointing:
            perf.checkpoint_activations(model, self.blocks)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the loop calls forward on (wrapped for the world); `model` stays the plain module."""
        return model

    def method(self, net: nn.Module, model: nn.Module, name: str) -> Callable[..., Any]:
        """The model's method `name` (forward, training_step, validation_step) run through the wrapped module,
        so the strategy's hooks fire for it as for forward."""
        return net if name == "forward" else getattr(model, name)

    # -- precision ------------------------------------------------------------------------------------------

    def autocast(self) -> ContextManager:
        """Around a forward: the compute dtype of trainer.precision (fp32: nothing)."""
        return autocast(self.world.device, self.precision)

    def grad_scaler(self) -> torch.amp.GradScaler:
        # fp16 only: its narrow range makes small gradients underflow unless the loss is scaled up first.
        return torch.amp.GradScaler(self.world.device.type, enabled=self.precision == Precision.fp16)

    # -- the step -------------------------------------------------------------------------------------------

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


def autocast(device: torch.device, precision: Precision) -> ContextManager:
    """The compute dtype of `precision` on `device` (fp32: nothing); also for a trained model's evaluation."""
    if precision == Precision.fp32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == Precision.bf16 else torch.float16)
