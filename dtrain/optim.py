"""Optimizers and learning-rate schedules, looked up by name. Schedules step once per optimizer step."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from dtrain.config import OptimConfig, SchedConfig
from dtrain.errors import ConfigError

OPTIMIZERS: dict[str, Callable[[Iterable, OptimConfig], torch.optim.Optimizer]] = {
    "sgd": lambda p, c: torch.optim.SGD(p, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov,
                                        weight_decay=c.weight_decay),
    "adam": lambda p, c: torch.optim.Adam(p, lr=c.lr, betas=tuple(c.betas), eps=c.eps,
                                          weight_decay=c.weight_decay),
    "adamw": lambda p, c: torch.optim.AdamW(p, lr=c.lr, betas=tuple(c.betas), eps=c.eps,
                                            weight_decay=c.weight_decay),
    "rmsprop": lambda p, c: torch.optim.RMSprop(p, lr=c.lr, alpha=c.alpha, eps=c.eps,
                                                momentum=c.momentum, weight_decay=c.weight_decay),
    "adagrad": lambda p, c: torch.optim.Adagrad(p, lr=c.lr, lr_decay=c.lr_decay, weight_decay=c.weight_decay,
                                                eps=c.eps),
}


def l1_penalty(params: list[torch.Tensor], coefficient: float) -> torch.Tensor | None:
    """coefficient * sum(|w|) over `params` (the tutorials' L1 regulariser), or None when it is off. It
    joins the loss before backward, so DDP averages its gradient with the rest."""
    if not coefficient:
        return None
    return coefficient * torch.stack([p.abs().sum() for p in params]).sum()


def build_optimizer(params: Iterable, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd" and cfg.nesterov and cfg.momentum <= 0:
        raise ConfigError(f"optim.nesterov=true needs optim.momentum > 0 (got {cfg.momentum})")
    return OPTIMIZERS[cfg.name](params, cfg)


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

    def factor(step: int) -> float:
        if step < warm:
            return cfg.warmup_start_factor + (1 - cfg.warmup_start_factor) * step / warm
        return decay(step - warm, total_steps - warm, steps_per_epoch, cfg, lr)

    return LambdaLR(opt, factor)
