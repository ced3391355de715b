"""How a model is wrapped, stepped and saved across the process world: one seam, one class per strategy.

    single   one process: the model as it is
    ddp      DistributedDataParallel: every rank holds the whole model, gradients are all-reduced

The loop only calls the `Strategy` methods: `setup` (wrap), `no_sync` (accumulate without reducing),
`clip_grad_norm`, `sync_buffers`, and the state-dict getters and setters the Checkpointer uses. A new
strategy (FSDP) is a new class here, not edits across the loop. `STRATEGIES` maps `dist.strategy` to it.
"""

from __future__ import annotations

from dtrain.strategy.base import Strategy
from dtrain.strategy.ddp import DDP
from dtrain.strategy.single import Single

STRATEGIES: dict[str, type[Strategy]] = {"ddp": DDP}


def build(name: str, world, dist, sync_batchnorm: bool) -> Strategy:
    """The strategy `dist.strategy` names; one process always trains with `Single`."""
    if not world.distributed:
        return Single(world)
    return STRATEGIES[name](world, dist, sync_batchnorm)


__all__ = ["Strategy", "Single", "DDP", "STRATEGIES", "build"]
