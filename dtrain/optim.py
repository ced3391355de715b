"""Optimizers and learning-rate schedules, looked up by name. Schedules step once per optimizer step."""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from dtrain import plugins
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
    if cfg.factory:  # an optimizer class of the user's own: where it takes the choice (build_optimizer)
        return _own_implementation(cfg, device_type, sharded, sparse)
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
    if cfg.factory:
        _own_arguments(cfg)
    elif cfg.kwargs:
        key = next(iter(cfg.kwargs))
        close = difflib.get_close_matches(key, [f.name for f in dataclasses.fields(OptimConfig)], n=1)
        raise ConfigError(f"optim.{key}: no such key ({f'did you mean optim.{close[0]}? ' if close else ''}dtrain's "
                          f"{cfg.name} takes none; an optimizer class of your own, optim._target_=..., takes any)")
    if cfg.name == "sgd" and cfg.nesterov and cfg.momentum <= 0:
        raise ConfigError(f"optim.nesterov=true needs optim.momentum > 0 (got {cfg.momentum})")
    for i, group in enumerate(cfg.param_groups):
        if not isinstance(group, Mapping) or not isinstance(group.get("params"), str):
            raise ConfigError(f"optim.param_groups[{i}]={group!r}: each group is {{params: GLOB, ...options}}, "
                              "GLOB over the model's parameter names (backbone.*)")
    implementation(cfg, "cpu", sharded)


def param_groups(model: torch.nn.Module, specs: list) -> list[dict]:
    """The model's parameters in optim.param_groups' groups: each glob over `named_parameters()` names takes the
    parameters it matches that no earlier one took, with its options; the rest form the default group. A glob
    that matches nothing is refused (a misspelt name would be ignored)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    taken: set[str] = set()
    groups = []
    for i, spec in enumerate(specs):
        mine = [(n, p) for n, p in named if n not in taken and fnmatch.fnmatchcase(n, spec["params"])]
        if not mine:
            examples = ", ".join(n for n, _ in named[:4])
            raise ConfigError(f"optim.param_groups[{i}].params={spec['params']!r} matches no parameter of the "
                              f"model, whose names are like {examples}")
        taken |= {n for n, _ in mine}
        groups.append({**{k: v for k, v in spec.items() if k != "params"}, "params": [p for _, p in mine]})
    rest = [p for n, p in named if n not in taken]
    return ([{"params": rest}] if rest else []) + groups


def l1_penalty(params: list[torch.Tensor], coefficient: float) -> torch.Tensor | None:
    """coefficient * sum(|w|) over `params` (the tutorials' L1 regulariser), or None when it is off. It
    joins the loss before backward, so DDP averages its gradient with the rest."""
    if not coefficient:
        return None
    return coefficient * torch.stack([p.abs().sum() for p in params]).sum()


def build_optimizer(params: Iterable | torch.nn.Module, cfg: OptimConfig, device_type: str = "cpu",
                    sharded: bool = False, sparse: bool = False) -> torch.optim.Optimizer:
    """The optimizer over a model's parameters (in optim.param_groups' groups) or a list of parameters."""
    check(cfg, sharded)
    groups = param_groups(params, cfg.param_groups) if isinstance(params, torch.nn.Module) else list(params)
    impl = implementation(cfg, device_type, sharded, sparse)
    if cfg.factory:
        cls, args = _own_arguments(cfg)
        choice = {k: impl == k for k in ("fused", "foreach") if k in plugins.accepted(cls, {k: None})}
    else:
        spec = OPTIMIZERS[cfg.name]
        cls, args = spec.cls, spec.args(cfg)
        choice = {"foreach": impl == "foreach", **({"fused": impl == "fused"} if spec.fused else {})}
    optimizer = cls(groups, **args, **choice)
    for i, group in enumerate(cfg.param_groups):
        unknown = sorted(set(group) - {"params"} - set(optimizer.defaults))
        if unknown:
            raise ConfigError(f"optim.param_groups[{i}]: {unknown[0]!r} is not an option of {cls.__name__} (its "
                              f"options: {', '.join(k for k in optimizer.defaults if not k.startswith('_'))})")
    return optimizer


def _own_arguments(cfg: OptimConfig) -> tuple[type, dict]:
    """An optimizer class of the user's own and its keyword arguments: optim.lr, the config's other keys for it,
    and those of dtrain's own keys (weight_decay, betas, momentum, eps, ...) the class takes and the config sets
    to other than their defaults."""
    cls = plugins.check("optim", cfg.factory, cfg.kwargs, offers=("lr",), positional=1)
    defaults = OptimConfig()
    own = {k: getattr(cfg, k) for k in ("weight_decay", "momentum", "nesterov", "betas", "eps", "alpha", "lr_decay")
           if getattr(cfg, k) != getattr(defaults, k)}
    accepted = plugins.accepted(cls, own)
    refused = sorted(own.keys() - accepted.keys())
    if refused:
        raise ConfigError(f"optim: {cfg.factory} takes no argument {refused[0]!r} (set it for dtrain's own "
                          "optimizers only, or leave it at its default)")
    return cls, {"lr": cfg.lr, **{k: tuple(v) if isinstance(v, list) else v for k, v in accepted.items()},
                 **cfg.kwargs}


def _own_implementation(cfg: OptimConfig, device_type: str, sharded: bool, sparse: bool) -> str:
    """fused, foreach or loop for an optimizer class of the user's own: what it takes, as for dtrain's own."""
    takes = plugins.accepted(plugins.resolve("optim", cfg.factory), {"fused": None, "foreach": None})
    chosen = cfg.implementation.value
    if chosen == "auto":
        return "loop" if sparse else "foreach" if "foreach" in takes else "loop"
    if chosen != "loop" and chosen not in takes:
        raise ConfigError(f"optim.implementation={chosen}: {cfg.factory} takes no {chosen}= argument; use "
                          "optim.implementation=auto or loop")
    return chosen


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
    if cfg.name == "onecycle":  # warms up by itself (validation rejects an extra warm-up); each group its own peak
        return OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=max(1, total_steps),
                          pct_start=cfg.pct_start)
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
