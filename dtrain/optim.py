"""Optimizers and learning-rate schedules, looked up by name. Schedules step once per optimizer step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from dtrain.config import OptimConfig, SchedConfig
from dtrain.errors import ConfigError

@dataclass(frozen=True)
class Spec:
    """An optimizer: its class, its keyword arguments from the config, and where PyTorch has a fused kernel
    (one kernel for every parameter's update: fastest, on CPU and CUDA alike)."""
    cls: type[torch.optim.Optimizer]
    args: Callable[[OptimConfig], dict]
    fused: bool = True
    fused_sharded: bool = False  # the fused kernel also takes FSDP2's sharded (DTensor) parameters


OPTIMIZERS: dict[str, Spec] = {
    "sgd": Spec(torch.optim.SGD, lambda c: dict(lr=c.lr, momentum=c.momentum, nesterov=c.nesterov,
                                                weight_decay=c.weight_decay)),
    "adam": Spec(torch.optim.Adam, lambda c: dict(lr=c.lr, betas=tuple(c.betas), eps=c.eps,
                                                  weight_decay=c.weight_decay), fused_sharded=True),
    "adamw": Spec(torch.optim.AdamW, lambda c: dict(lr=c.lr, betas=tuple(c.betas), eps=c.eps,
                                                    weight_decay=c.weight_decay), fused_sharded=True),
    "rmsprop": Spec(torch.optim.RMSprop, lambda c: dict(lr=c.lr, alpha=c.alpha, eps=c.eps, momentum=c.momentum,
                                                        weight_decay=c.weight_decay), fused=False),
    "adagrad": Spec(torch.optim.Adagrad, lambda c: dict(lr=c.lr, lr_decay=c.lr_decay,
                                                        weight_decay=c.weight_decay, eps=c.eps)),
}
FUSED_DEVICES = ("cpu", "cuda")


def implementation(cfg: OptimConfig, device_type: str, sharded: bool, sparse: bool = False) -> str:
    """fused, foreach or loop: optim.implementation, where auto is fused wherever PyTorch has the kernel
    for this optimizer, device and strategy, else foreach (one op over all parameters' lists). `sparse`:
    the model makes sparse gradients (nn.Embedding(sparse=True)), which only the loop takes (fused kernels
    refuse them, foreach SGD with momentum fails on them)."""
    spec, chosen = OPTIMIZERS[cfg.name], cfg.implementation.value
    has_fused = spec.fused and device_type in FUSED_DEVICES and (spec.fused_sharded or not sharded)
    if chosen == "auto":
        return "loop" if sparse else "fused" if has_fused else "foreach"
    if chosen == "fused" and not has_fused:
        where = ("dist.strategy=fsdp's sharded parameters" if spec.fused and sharded else
                 device_type if spec.fused else "any device")
        raise ConfigError(f"optim.implementation=fused: PyTorch has no fused {cfg.name} for {where}; use "
                          "optim.implementation=auto (fused where it exists, else foreach)")
    if chosen != "loop" and sparse:
        raise ConfigError(f"optim.implementation={chosen}: the model makes sparse gradients (an nn.Embedding "
                          "or EmbeddingBag with sparse=True), which only the loop implementation takes; use "
                          "optim.implementation=auto or loop")
    return chosen


def makes_sparse_gradients(model: torch.nn.Module) -> bool:
    return any(isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.sparse for m in model.modules())


def check(cfg: OptimConfig, sharded: bool) -> None:
    """The optimizer settings that are wrong on any device, refused before anything is built."""
    if cfg.name == "sgd" and cfg.nesterov and cfg.momentum <= 0:
        raise ConfigError(f"optim.nesterov=true needs optim.momentum > 0 (got {cfg.momentum})")
    implementation(cfg, "cpu", sharded)


def l1_penalty(params: list[torch.Tensor], coefficient: float) -> torch.Tensor | None:
    """coefficient * sum(|w|) over `params` (the tutorials' L1 regulariser), or None when it is off. It
    joins the loss before backward, so DDP averages its gradient with the rest."""
    if not coefficient:
        return None
    return coefficient * torch.stack([p.abs().sum() for p in params]).sum()


def build_optimizer(params: Iterable, cfg: OptimConfig, device_type: str = "cpu", sharded: bool = False,
                    sparse: bool = False) -> torch.optim.Optimizer:
    check(cfg, sharded)
    spec, impl = OPTIMIZERS[cfg.name], implementation(cfg, device_type, sharded, sparse)
    choice = {"foreach": impl == "foreach", **({"fused": impl == "fused"} if spec.fused else {})}
    return spec.cls(params, **spec.args(cfg), **choice)


def implementation_of(optimizer: torch.optim.Optimizer) -> str:
    """What a built optimizer runs: fused, foreach or loop."""
    group = optimizer.defaults
    return "fused" if group.get("fused") else "foreach" if group.get("foreach") else "loop"


def own_implementation(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A saved optimizer state with this optimizer's implementation flags (PyTorch keeps them in each saved
    param group): a checkpoint never overrides the configured implementation, nor brings a fused flag to a
    device or strategy without the kernel."""
    own = {k: optimizer.defaults[k] for k in ("fused", "foreach") if k in optimizer.defaults}
    return {**state, "param_groups": [{**g, **own} for g in state["param_groups"]]}


# Each decay maps (step, total steps, steps per epoch, config) to a multiplier of the base lr.
_DECAYS: dict[str, Callable[[int, int, int, SchedConfig, float], float]] = {
    "none": lambda s, total, per_epoch, c, lr: 1.0,
    "step": lambda s, total, per_epoch, c, lr: c.gamma ** (s // (c.step_size * per_epoch)),
    "cosine": lambda s, total, per_epoch, c, lr: (
        c.min_lr / lr + (1 - c.min_lr / lr) * 0.5 * (1 + math.cos(math.pi * min(s, total) / max(1, total)))),
}
SCHEDULES = (*_DECAYS, "onecycle")


def build_scheduler(opt: torch.optim.Optimizer, cfg: SchedConfig, lr: float, total_steps: int,
                    steps_per_epoch: int) -> LRScheduler:
    if cfg.name == "onecycle":  # warms up by itself (validation rejects an extra warm-up)
        return OneCycleLR(opt, max_lr=lr, total_steps=max(1, total_steps), pct_start=cfg.pct_start)
    decay, warm = _DECAYS[cfg.name], cfg.warmup_steps
    if cfg.name == "none" and not warm:
        return Constant(opt)

    def factor(step: int) -> float:
        if step < warm:
            return cfg.warmup_start_factor + (1 - cfg.warmup_start_factor) * step / warm
        return decay(step - warm, total_steps - warm, steps_per_epoch, cfg, lr)

    return LambdaLR(opt, factor)


class Constant(LambdaLR):
    """sched=none without warm-up: the lr never changes, so a step only counts (LambdaLR would compute and
    assign the same lr to every group on every step). Its state is LambdaLR's, so checkpoints load alike."""

    def __init__(self, opt: torch.optim.Optimizer):
        super().__init__(opt, lambda step: 1.0)

    def load_state_dict(self, state_dict: dict) -> None:
        """As LambdaLR's next step would: the lr is the base lr again (a resume from another schedule)."""
        super().load_state_dict(state_dict)
        for group, lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = lr
        self._last_lr = list(self.base_lrs)

    def step(self, epoch: Optional[int] = None) -> None:
        if epoch is not None or self._step_count == 0:  # the constructor's first step sets the lr
            return super().step(epoch)
        self._step_count += 1
        self.last_epoch += 1
