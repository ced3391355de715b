"""How a model is spread over the process world, wrapped, stepped and saved: one seam, one class per strategy.

    single   one process: the model as it is (what any strategy that needs a process group falls back to alone)
    ddp      DistributedDataParallel: every rank holds the whole model, gradients are all-reduced
    fsdp     FSDP2: parameters, gradients and optimizer state sharded over the ranks

A strategy owns what differs between them: building and wrapping the model (meta-device init, activation
checkpointing, sharding), precision (autocast, the gradient scaler, a mixed-precision policy), no-sync for
accumulation, clipping, the layout of its checkpoints, its own config rules and options, and the
data-parallel coordinates the samplers and metric reductions use. No strategy name is tested outside this
package. `dist.strategy` names an entry of `STRATEGIES`, or the dotted path of a `Strategy` subclass of
your own (`dist.strategy=mypkg.strategies.Mine`); `register` adds one by name (one file, one call).
"""

from __future__ import annotations

from dtrain import plugins
from dtrain import world as w
from dtrain.config import Config
from dtrain.errors import ConfigError
from dtrain.strategy.base import Strategy
from dtrain.strategy.ddp import DDP
from dtrain.strategy.fsdp import FSDP
from dtrain.strategy.single import Single

STRATEGIES: dict[str, type[Strategy]] = {"ddp": DDP, "fsdp": FSDP}


def register(cls: type[Strategy], name: str | None = None) -> type[Strategy]:
    """Add a strategy by name (its class's `name` by default); usable as a class decorator."""
    STRATEGIES[name or cls.name] = cls
    return cls


def resolve(name: str) -> type[Strategy]:
    """The class `dist.strategy` names: a registered name, or the dotted path of a Strategy subclass."""
    if name in STRATEGIES:
        return STRATEGIES[name]
    if "." in name:
        cls = plugins.resolve("dist.strategy", name)
        if isinstance(cls, type) and issubclass(cls, Strategy):
            return cls
        raise ConfigError(f"dist.strategy={name} is a {type(cls).__name__}, not a dtrain.strategy.Strategy subclass")
    raise ConfigError(f"dist.strategy={name!r} is not allowed: choose one of {', '.join(sorted(STRATEGIES))}, or "
                      "the dotted path of a dtrain.strategy.Strategy subclass of your own")


def check(cfg: Config) -> None:
    """The chosen strategy's config rules, before anything is built (one ConfigError naming the key)."""
    cls = resolve(cfg.dist.strategy)
    cls.check(cfg, [other for other in dict.fromkeys(STRATEGIES.values()) if other is not cls])


def build(cfg: Config, world: w.World) -> Strategy:
    """The strategy `dist.strategy` names; one process trains with `Single` where it needs a process group."""
    cls = resolve(cfg.dist.strategy)
    return Single(cfg, world) if cls.needs_group and not world.distributed else cls(cfg, world)


def checkpoint_format(cfg: Config) -> str:
    """file or dcp: checkpoint.format, where auto is the strategy's own layout."""
    fmt = cfg.checkpoint.format.value
    return fmt if fmt != "auto" else resolve(cfg.dist.strategy).checkpoint_format


__all__ = ["Strategy", "Single", "DDP", "FSDP", "STRATEGIES", "register", "resolve", "check", "build",
           "checkpoint_format"]
