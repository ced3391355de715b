"""How a model is wrapped, stepped and saved across the process world: one seam, one class per strategy.

    single   one process: the model as it is
    ddp      DistributedDataParallel: every rank holds the whole model, gradients are all-reduced

The loop only calls the `Strategy` methods: `setup` (wrap), `no_sync` (accumulate without reducing),
`clip_grad_norm`, `sync_buffers`, and the state-dict getters and setters the Checkpointer uses. A new
strategy (FSDP) is a new class here, not edits across the loop. `STRATEGIES` maps `dist.strategy` to it.
"""

from __future__ import annotations

from typing import Callable

import torch

from dtrain.config import Config, Precision
from dtrain.strategy.base import Strategy
from dtrain.strategy.ddp import DDP
from dtrain.strategy.fsdp import FSDP
from dtrain.strategy.single import Single

# dist.strategy -> how to make it from the config, the world and the model's blocks (by class)
STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "ddp": lambda cfg, world, blocks: DDP(world, cfg.dist, cfg.model.sync_batchnorm),
    "fsdp": lambda cfg, world, blocks: FSDP(world, cfg.dist.fsdp.shard if cfg.dist.fsdp.shard is not None else blocks,
                                            cfg.dist.fsdp.reshard_after_forward,
                                            torch.bfloat16 if cfg.trainer.precision == Precision.bf16 else None),
}


def build(cfg: Config, world, blocks: tuple[str, ...]) -> Strategy:
    """The strategy `dist.strategy` names; one process always trains with `Single`."""
    if not world.distributed:
        return Single(world)
    return STRATEGIES[cfg.dist.strategy.value](cfg, world, blocks)


__all__ = ["Strategy", "Single", "DDP", "FSDP", "STRATEGIES", "build"]
