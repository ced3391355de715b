"""Writing and reading a checkpoint's Stateful parts (dtrain/stateful.py), one path for both layouts:

    file   every rank gathers the model's and optimizer's full state (the strategy lays it out), every part's
           state dict is taken, and the main rank writes one step-N.pt (dtrain/checkpoint.py's contract)
    dcp    every rank writes its shards of the model and optimizer into a temporary folder (synchronously,
           or in the background coordinated in a gloo group of its own), the main rank adds state.pt with
           every other part, and the folder is renamed step-N once all of it is durable

Every rank takes part, and every rank fails together: a write the disk refuses is one CheckpointError on
all of them, with the temporary file or folder removed and `latest` still naming the last good one. A
background save that fails is noticed by the loop's next stop agreement (`failed`) or the next `wait`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from dtrain import checkpoint, dcp
from dtrain import world as w
from dtrain.config import CheckpointConfig
from dtrain.errors import CheckpointError
from dtrain.logs import log
from dtrain.stateful import Parts


@dataclass
class _Pending:
    """A distributed checkpoint being written: every rank's shards go to `written`, then it is published."""
    future: Any  # the asynchronous write's future, or None once written
    written: Path
    state: dict  # every other part's state and what the checkpoint is (state.pt)
    step: int
    is_best: bool
    nbytes: int  # what this rank writes
    publisher: Optional[threading.Thread] = None  # an asynchronous save publishes in the background
    error: Optional[str] = None


class Writer:
    """Writes a run's checkpoints into `folder` in one layout (`fmt`: file or dcp) and reads any back."""

    def __init__(self, folder: Path, cfg: CheckpointConfig, world: w.World, fmt: str, enabled: bool = True):
        self.folder, self.cfg, self.world, self.fmt = folder, cfg, world, fmt
        self.pending: Optional[_Pending] = None
        self.stall_s = 0.0  # how long the loop waited on saves since `take_stall`
        # An asynchronous save coordinates its ranks in its own gloo group, off the training group's collectives.
        self.group = w.new_group("gloo") if cfg.async_save and world.distributed and enabled else None
        self.stager = dcp.stager() if cfg.async_save and enabled else None

    # -- writing ------------------------------------------------------------------------------------------

    def write(self, parts: Parts, step: int, is_best: bool, meta: dict, wait: bool = False) -> None:
        """All ranks: write `parts` and `meta` (what the checkpoint is) as the checkpoint of `step`. An
        asynchronous save returns once its shards are staged; the next write, or `wait`, publishes it."""
        self.wait()  # the previous asynchronous save completes first
        if self.fmt == "dcp":
            self._stage(parts, step, is_best, meta)
            if wait or self.pending.future is None:
                self.wait()
            return
        state = {**parts.strategy.state(parts.model, parts.optimizer), **_states(parts), **meta}  # gathers
        self._on_main(lambda: checkpoint.save(self.folder, state, step, self.cfg.keep_last, is_best), is_best)

    def _stage(self, parts: Parts, step: int, is_best: bool, meta: dict) -> None:
        """Every rank writes its shards of a distributed checkpoint to a temporary folder."""
        written = dcp.temporary(self.folder / f"step-{step:08d}")
        self._on_main(lambda: (self.folder.mkdir(parents=True, exist_ok=True), dcp.remove(written)))
        tensors = dcp.sharded_state(parts.model, parts.optimizer)
        tensors["model"] = dcp.rank_0_buffers(parts.model, tensors["model"])
        nbytes = dcp.local_bytes(tensors)
        try:
            futures = dcp.write(written, tensors, self.group, self.stager)
        except BaseException as e:  # a synchronous save fails on every rank together (DCP gathers the errors)
            if not dcp.refused_by_disk(e):
                raise
            failed = checkpoint.write_failed(self.folder, e, nbytes)
            self._on_main(lambda: dcp.remove(written))
            failed.same_on_every_rank = True
            raise failed from None
        staged, future = futures or (None, None)
        self.pending = _Pending(future, written, {**_states(parts), **meta}, step, is_best, nbytes)
        if future is None:
            return
        # The copy goes on while the next step's forward and backward run; its update waits for it.
        hook: list = []
        pending = self.pending
        hook.append(parts.optimizer.register_step_pre_hook(lambda *_: self._until(pending, staged, hook[0])))
        pending.publisher = threading.Thread(target=self._publish, args=(pending,), daemon=True,
                                             name="dtrain-checkpoint")  # the main rank publishes, off the loop
        pending.publisher.start()

    def _until(self, pending: _Pending, staged, hook) -> None:
        """Before the optimizer changes what is being copied: the copy done (the wait counts as a stall). A
        copy that failed is the save's failure, reported by the next agreement (`failed`) or `wait`."""
        start = time.perf_counter()
        try:
            staged.result()
        except dcp.failures() as e:
            pending.error = pending.error or checkpoint.why_not_written(self.folder, e, pending.nbytes)
        hook.remove()
        self.stall_s += time.perf_counter() - start

    def _publish(self, pending: _Pending) -> None:
        """Wait for this rank's shards, learn whether every rank's were written (in the save's own group, so
        that no rank waits for one that failed), then the main rank publishes, or removes the temporary
        folder of a save that failed. Any failure is kept in `pending.error`, for `wait` to report."""
        try:
            if pending.future is not None:
                pending.future.result()
        except dcp.failures() as e:  # this thread must not die of it: `wait` reports it
            pending.error = pending.error or checkpoint.why_not_written(self.folder, e, pending.nbytes)
        errors = [e for e in w.gather_objects(pending.error, self.group) if e]
        if not self.world.is_main:
            return
        try:
            if errors:
                pending.error = errors[0]
                return
            path = checkpoint.publish(self.folder, pending.written, pending.state, pending.step, self.cfg.keep_last,
                                      pending.is_best)
            log.info(f"checkpoint: {path}" + (" (best)" if pending.is_best else ""))
        except dcp.failures() as e:  # reported by `wait`
            cause = e.__cause__ if isinstance(e, CheckpointError) and e.__cause__ is not None else e
            pending.error = checkpoint.why_not_written(self.folder, cause, pending.nbytes)
        finally:
            if pending.error:
                dcp.remove(pending.written)

    @property
    def failed(self) -> bool:
        """Whether this rank knows the save being written in the background has failed (no collective: the
        ranks agree on it with the stop signal, then `wait` reports it on every rank)."""
        return self.pending is not None and self.pending.error is not None

    def wait(self) -> None:
        """The pending distributed checkpoint published (before the next save, at the end, and before a
        process stops); every rank fails together if any rank's part failed."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        if pending.publisher is None:
            self._publish(pending)
        else:
            pending.publisher.join()  # the copy is done too: it comes before the write
        errors = [e for e in w.gather_objects(pending.error) if e]
        if errors:
            failed = CheckpointError(f"could not write the checkpoint of step {pending.step} in {self.folder}: "
                                     f"{errors[0]}; the checkpoints already there are untouched. Free space or fix "
                                     "the folder's permissions, then resume")
            failed.same_on_every_rank = True
            raise failed

    def _on_main(self, write: Callable[[], Any], is_best: Optional[bool] = None) -> None:
        """`write` on the main rank; every rank learns whether it failed, and fails with it."""
        error = None
        if self.world.is_main:
            try:
                path = write()
                if is_best is not None:
                    log.info(f"checkpoint: {path}" + (" (best)" if is_best else ""))
            except CheckpointError as e:
                error = str(e)
            except OSError as e:
                error = str(checkpoint.write_failed(self.folder, e))
        error = w.broadcast_object(error)
        if error:
            failed = CheckpointError(error)
            failed.same_on_every_rank = True
            raise failed

    def take_stall(self) -> float:
        """Seconds the loop waited on saves since the last call."""
        stall, self.stall_s = self.stall_s, 0.0
        return stall


def _states(parts: Parts) -> dict:
    """Every part's state dict but the model's and optimizer's (every rank: some parts gather)."""
    return {name: part.state_dict() for name, part in parts.states.items()}


def read(state: dict, parts: Parts, model_name: str) -> None:
    """A loaded checkpoint (checkpoint.load) into `parts`: the model and optimizer resharded to this layout,
    whatever layout saved them, then every other part in order. A part the checkpoint lacks keeps its state."""
    parts.strategy.load(parts.model, parts.optimizer, state, model_name)
    for name, part in parts.states.items():
        if state.get(name) is not None:
            part.load_state_dict(state[name])
