"""How the ranks agree to stop: a stop signal (SIGTERM, SIGUSR1, Ctrl-C) on any rank, or a checkpoint that
failed to write in the background, acted on by every rank after the same step."""

from __future__ import annotations

import signal
from typing import Callable, Optional

import torch
from torch import nn

from dtrain import world as w
from dtrain.checkpoint import rng_state, set_rng_state
from dtrain.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, Preempted


SAVE_FAILED = 1 << 8  # in a vote, above every signal number: some rank's background checkpoint failed


class StopVote:
    """How the ranks agree on a stop signal (every trainer.sync_every_n_steps steps) without waiting for one
    another. Alone, a signal is acted on at once. Under DDP the all-reduce of the ranks' signals starts
    after step kN and is read in step kN+1 after its (first micro-batch's) backward, whose gradient
    all-reduce, if any, has waited for it already, and before anything of that step is kept. A stop agreed
    there undoes what that forward and backward changed that a checkpoint holds (the random states;
    buffers such as batch norm's running statistics), so training stops after step kN, where waiting for
    the vote would have stopped it. The same vote carries whether a rank's background checkpoint failed:
    then every rank calls `on_failed_save`, which reports it (CheckpointError) on all of them."""

    def __init__(self, world: w.World, model: nn.Module, on_failed_save: Callable[[], None]):
        self.world, self.model, self.on_failed_save = world, model, on_failed_save
        self.pending: Optional[tuple[Callable[[], int], dict, list[torch.Tensor]]] = None  # vote, rng, buffers

    def start(self, signum: int, save_failed: bool = False) -> None:
        value = signum | (SAVE_FAILED if save_failed else 0)
        if not self.world.distributed:
            self.act(w.max_over_ranks(value, self.world.device))
            return
        self.pending = (w.start_max_over_ranks(value, self.world.device), rng_state(),
                        [b.detach().clone() for b in self.model.buffers()])

    def settle(self) -> None:
        """Read the vote in flight, if any. On a stop: back to the step it started after, then Preempted."""
        if self.pending is None:
            return
        (vote, rng, buffers), self.pending = self.pending, None
        value = vote()
        if value:
            set_rng_state(rng)
            with torch.no_grad():
                for b, kept in zip(self.model.buffers(), buffers):
                    b.copy_(kept)
            self.act(value)

    def act(self, value: int) -> None:
        if value & SAVE_FAILED:
            self.on_failed_save()
        stop_if(value & ~SAVE_FAILED)


def stop_if(signum: int) -> None:
    if signum:
        raise Preempted(signum, EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_PREEMPTED)
