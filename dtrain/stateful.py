"""What a checkpoint is made of: Stateful parts, each with `state_dict()` / `load_state_dict()`, by name (as
torchtitan's CheckpointManager takes them). The model and the optimizer are laid out by the strategy (whole
in a checkpoint file, each rank's shards in a distributed checkpoint); every other part is a plain state dict:
the scheduler, the gradient scaler, the loop's progress, the callbacks, the metric logger, and each rank's
random state and running sums (`RankState`). dtrain/saving.py writes and reads them, one path for both
layouts; dtrain/checkpointer.py decides when."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import torch
from torch import nn

from dtrain import world as w
from dtrain.checkpoint import rng_state, seed_everything, set_rng_state
from dtrain.errors import CheckpointError
from dtrain.logs import log


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Progress:
    """Where training stands: the loop's own state, saved in every checkpoint."""
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    samples_in_epoch: int = 0  # global samples of the current epoch already trained on

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "samples_in_epoch": self.samples_in_epoch}

    def load_state_dict(self, state: dict) -> None:  # in place: the loop holds a reference to it
        self.epoch, self.step, self.samples_in_epoch = state["epoch"], state["step"], state["samples_in_epoch"]


class RankState:
    """Each rank's own random state and running sums, gathered from every rank into the checkpoint (a
    collective: every rank calls `state_dict`). The same data-parallel layout continues each data-parallel
    rank's exactly (under tensor parallelism the tp ranks of a group share theirs, whatever tp was). Another
    cannot: random streams restart from the seed (a warning says so; the same within a tp group) and the
    sums, being additive, go to the first data-parallel rank, each group's counted once. The data position
    itself re-shards on any world size (data.TrainSampler)."""

    def __init__(self, world: w.World, seed: int, progress: Progress, sums: Any, stream: Any = None,
                 dp: Optional[w.DataParallel] = None):
        self.world, self.seed, self.progress, self.sums = world, seed, progress, sums
        self.stream = stream  # a stream's loader: each rank's position in its share (torchdata's state)
        self.dp = dp or w.DataParallel(world.rank, world.world_size)

    def state_dict(self) -> dict:
        mine = {"rng": rng_state(), "epoch_sums": self.sums.value().cpu(),
                **({"stream": self.stream.state_dict()} if self.stream is not None else {})}
        return {"world_size": self.world.world_size, "dp_size": self.dp.size, "ranks": w.gather_objects(mine)}

    def load_state_dict(self, state: dict) -> None:
        ranks, dp_size = state["ranks"], state.get("dp_size", state["world_size"])
        tp = state["world_size"] // dp_size  # the saved run's tensor-parallel group size
        if dp_size == self.dp.size:
            share = dict(ranks[self.dp.rank * tp])  # the first rank of this data-parallel group then
            set_rng_state(share.pop("rng"))
            self.sums.reset(share["epoch_sums"])
            if self.stream is not None and "stream" in share:
                self.stream.load_state_dict(share["stream"])
                if self.stream.fast_forward and self.progress.samples_in_epoch:
                    log.info("data: the stream has no state_dict of its own, so resuming reads each share again up "
                             "to where it stopped (give it state_dict/load_state_dict to skip that)")
            return
        if self.stream is not None and "stream" in ranks[0]:
            raise CheckpointError(f"this checkpoint holds the positions of {dp_size} data-parallel ranks' shares of "
                                  f"a stream, which do not move to {self.dp.size}; resume with {dp_size} data-parallel "
                                  "ranks (or resume=none)")
        log.warning(f"resuming {dp_size} data-parallel ranks' checkpoint on {self.dp.size}: data continues from the "
                    "saved position, random streams are re-seeded")
        seed_everything(self.seed + self.dp.rank + self.progress.step)
        firsts = ranks[::tp]  # one rank of each saved tp group: their sums are the same
        self.sums.reset(sum(r["epoch_sums"] for r in firsts) * (1 if self.dp.rank == 0 else 0))


@dataclass
class Parts:
    """Everything a checkpoint holds: the model and its optimizer, whose layout is the strategy's, and the
    other Stateful parts by name (loaded in this order: the progress before what depends on it)."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    strategy: Any  # dtrain.strategy.Strategy
    states: dict[str, Stateful] = field(default_factory=dict)
