"""The checkpoint protocol across ranks: when to save, how every rank takes part (the main rank writes a
file; with checkpoint.format=dcp every rank writes its own shards, synchronously or in the background),
failing together, what to resume from, and per-rank state when the world size changed. The files
themselves are dtrain/checkpoint.py's contract."""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch
from torch import nn

from dtrain import dcp, signals
from dtrain import world as w
from dtrain.checkpoint import (config_changes, find_resumable, follow_latest, load, publish, rng_state, save,
                               seed_everything, set_rng_state, why_not_written,
                               write_failed)
from dtrain.config import CheckpointConfig
from dtrain.errors import CheckpointError, Preempted
from dtrain.logs import log


class Checkpointable(Protocol):
    model: nn.Module
    optimizer: torch.optim.Optimizer

    def state_dict(self, weights: bool = True) -> dict: ...  # every rank: model, optimizer (full), progress, ...
    def rank_state(self) -> dict[str, torch.Tensor]: ...  # this rank's own additive sums
    def load_state_dict(self, state: dict) -> None: ...  # state["rank"] holds this rank's sums


@dataclass
class _Pending:
    """A distributed checkpoint being written: every rank's shards go to `written`, then it is published."""
    future: Any  # the asynchronous write's future, or None once written
    written: Path
    state: dict
    step: int
    is_best: bool
    publisher: Optional[threading.Thread] = None  # an asynchronous save publishes in the background
    error: Optional[str] = None
    nbytes: int = 0  # what this rank writes


class Checkpointer:
    """When to save, how every rank takes part, and what to resume from, for one run folder."""

    def __init__(self, folder: Path, cfg: CheckpointConfig, world: w.World, enabled: bool, monitor: str,
                 higher_is_better: bool, seed: int, config: dict, record_change: Callable[[str], None],
                 fmt: str = "file"):
        self.folder, self.cfg, self.world, self.enabled = folder, cfg, world, enabled and cfg.enabled
        self.monitor, self.higher_is_better, self.seed = monitor, higher_is_better, seed
        self.config, self.record_change = config, record_change  # this run's config; where changes are noted
        self.best: Optional[float] = None  # the monitored value of best.pt
        self.fmt, self.pending = fmt, None
        self.stall_s = 0.0  # how long the loop waited on saves since `take_stall`
        self.saved_step: Optional[int] = None  # the step of the last save
        # An asynchronous save coordinates its ranks in its own gloo group, off the training group's collectives.
        self.group = w.new_group("gloo") if cfg.async_save and world.distributed and self.enabled else None
        self.stager = dcp.stager() if cfg.async_save and self.enabled else None

    def should_save(self, step: int, epoch: int, *, epoch_end: bool, last: bool = False) -> bool:
        """At the end of training, every `every_n_epochs` epochs, every `every_n_steps` steps. At an epoch's
        end both cadences count, so a step that ends an epoch is saved once, with its validation."""
        by_step = bool(self.cfg.every_n_steps) and step % self.cfg.every_n_steps == 0
        by_epoch = epoch_end and bool(self.cfg.every_n_epochs) and epoch % self.cfg.every_n_epochs == 0
        return self.enabled and (last or by_step or by_epoch)

    def save(self, trainer: Checkpointable, step: int, val: Optional[dict] = None, wait: bool = False) -> None:
        """All ranks call this: gather every rank's RNG and sums, write (the main rank a file; every rank its
        shards of a distributed checkpoint), fail together. `val` (the epoch's validation metrics, or None
        mid-epoch) decides whether this becomes the best. An asynchronous save returns once its shards are
        staged; the next save, or `wait`, publishes it."""
        start = time.perf_counter()
        self.wait()  # the previous asynchronous save completes first
        ranks = w.gather_objects({"rng": rng_state(), **{k: v.cpu() for k, v in trainer.rank_state().items()}})
        is_best = False
        if val is not None:  # a NaN or infinite value never becomes the best
            value = val[self.monitor.removeprefix("val_")]
            is_best = math.isfinite(value) and (self.best is None or (
                value > self.best if self.higher_is_better else value < self.best))
            self.best = value if is_best else self.best
        extra = {"best": self.best, "ranks": ranks, "world_size": self.world.world_size}
        if self.fmt == "dcp":
            self._stage(trainer, step, extra, is_best)
            if wait or self.pending.future is None:
                self.wait()
        else:
            state = {**trainer.state_dict(), **extra}  # on every rank: a sharded model gathers here
            self._on_main(lambda: save(self.folder, state, step, self.cfg.keep_last, is_best), is_best)
        self.saved_step = step
        self.stall_s += time.perf_counter() - start

    def _stage(self, trainer: Checkpointable, step: int, extra: dict, is_best: bool) -> None:
        """Every rank writes its shards of a distributed checkpoint to a temporary folder."""
        written = dcp.temporary(self.folder / f"step-{step:08d}")
        self._on_main(lambda: (self.folder.mkdir(parents=True, exist_ok=True), dcp.remove(written)))
        tensors = dcp.sharded_state(trainer.model, trainer.optimizer)
        tensors["model"] = dcp.rank_0_buffers(trainer.model, tensors["model"])
        try:
            futures = dcp.write(written, tensors, self.group, self.stager)
        except BaseException as e:  # a synchronous save fails on every rank together (DCP gathers the errors)
            if not dcp.refused_by_disk(e):
                raise
            failed = write_failed(self.folder, e, dcp.local_bytes(tensors))
            self._on_main(lambda: dcp.remove(written))
            failed.same_on_every_rank = True
            raise failed from None
        staged, future = futures or (None, None)
        self.pending = _Pending(future, written, {**trainer.state_dict(weights=False), **extra}, step, is_best,
                                nbytes=dcp.local_bytes(tensors))
        if future is None:
            return
        # The copy goes on while the next step's forward and backward run; its update waits for it.
        hook: list = []
        hook.append(trainer.optimizer.register_step_pre_hook(lambda *_: self._until(self.pending, staged, hook[0])))
        self.pending.publisher = threading.Thread(target=self._publish, args=(self.pending,), daemon=True,
                                                  name="dtrain-checkpoint")  # the main rank publishes, off the loop
        self.pending.publisher.start()

    def _until(self, pending: _Pending, staged, hook) -> None:
        """Before the optimizer changes what is being copied: the copy done (the wait counts as a stall). A
        copy that failed is the save's failure, reported by the next agreement (`failed`) or `wait`."""
        start = time.perf_counter()
        try:
            staged.result()
        except dcp.failures() as e:  # reported by `wait`
            pending.error = pending.error or why_not_written(self.folder, e, pending.nbytes)
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
            pending.error = pending.error or why_not_written(self.folder, e, pending.nbytes)
        errors = [e for e in w.gather_objects(pending.error, self.group) if e]
        if not self.world.is_main:
            return
        try:
            if errors:
                pending.error = errors[0]
                return
            path = publish(self.folder, pending.written, pending.state, pending.step, self.cfg.keep_last,
                           pending.is_best)
            log.info(f"checkpoint: {path}" + (" (best)" if pending.is_best else ""))
        except dcp.failures() as e:  # reported by `wait`
            cause = e.__cause__ if isinstance(e, CheckpointError) and e.__cause__ is not None else e
            pending.error = why_not_written(self.folder, cause, pending.nbytes)
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
                error = str(write_failed(self.folder, e))
        error = w.broadcast_object(error)
        if error:
            failed = CheckpointError(error)
            failed.same_on_every_rank = True
            raise failed

    def best_name(self) -> Optional[str]:
        """What holds the best checkpoint in the folder: a file `best.pt`, a pointer `best`, or None."""
        return next((name for name in ("best", "best.pt") if (self.folder / name).exists()), None)

    def take_stall(self) -> float:
        """Seconds the loop waited on saves since the last call."""
        stall, self.stall_s = self.stall_s, 0.0
        return stall

    def save_on_stop(self, trainer: Checkpointable, step: int, stop: Preempted) -> None:
        """Every rank got here after the same step of a stop signal: checkpoint it (if checkpointing is on)
        and say, once, how to go on."""
        why = f"stopped by {signals.name(stop.signum)} after step {step}"
        if not self.enabled:
            stop.code = 128 + stop.signum  # nothing saved, so no "requeue me"
            log.info(f"{why}; checkpointing is off (checkpoint.enabled=false or a debug mode), so nothing "
                     "was saved and a rerun starts over")
            return
        if self.saved_step == step:  # a stop agreed in the step after this step's own save (trainer.StopVote)
            self.wait()
        else:
            self.save(trainer, step, wait=True)
        log.info(f"{why}: checkpoint saved; exiting with {stop.code}. To continue, run the same command with "
                 f"resume=last (the newest run of this config) or hydra.run.dir={self.folder.parent}")

    def resume(self, trainer: Checkpointable, resume: str) -> Optional[dict]:
        """Load `resume` (auto: the newest good checkpoint here, if any; none; a path) into `trainer`
        on every rank. Returns the checkpoint's state, or None when starting fresh."""
        if resume == "none" or resume in ("auto", "last") and not self.enabled:
            return None
        if resume in ("auto", "last"):  # for last, the run folder already is the newest run's (rundir.folder_id)
            # The main rank picks the newest good checkpoint, so all ranks load the same one (or fail together).
            path, error = None, None
            if self.world.is_main:
                try:
                    found = find_resumable(self.folder)
                    path = str(found[0]) if found else None
                except CheckpointError as e:
                    error = str(e)
            path, error = w.broadcast_object((path, error))
            if error:
                refused = CheckpointError(error)
                refused.same_on_every_rank = True
                raise refused
            if path is None:
                return None
        else:
            path = str(follow_latest(Path(resume)))
        state = load(Path(path), map_location=self.world.device)
        if state["model_name"] != self.config["model"]["name"]:
            raise CheckpointError(f"checkpoint {path} holds model={state['model_name']} but the config asks for "
                                  f"model={self.config['model']['name']}; pass the matching model= or "
                                  "resume=none to start fresh")
        try:
            state["rank"] = self._this_ranks_share(state)
            trainer.load_state_dict(state)
        except Exception as e:  # a file that loads but does not fit: the clear error, never a traceback
            raise CheckpointError(f"checkpoint {path} {(str(e).splitlines() or [''])[0]}") from e
        self._check_config(state["config"], path)
        self.best = state.get("best")
        where = f"in epoch {state['epoch'] + 1}" if state["samples_in_epoch"] else f"after epoch {state['epoch']}"
        log.info(f"resumed from {path}: step {state['step']}, {where}")
        return state

    def _check_config(self, saved: dict, path: str) -> None:
        """Resuming with other training values would mix two runs under one record: refuse, naming the
        keys, unless checkpoint.allow_config_change=true, which notes what changed and when."""
        changes = config_changes(saved, self.config)
        if not changes:
            return
        listed = ", ".join(f"{k}={a!r} -> {b!r}" for k, (a, b) in changes.items())
        if not self.cfg.allow_config_change:
            refused = CheckpointError(f"checkpoint {path} was trained with other values: {listed}; rerun with the "
                                      "original values, resume=none to start fresh, or checkpoint."
                                      "allow_config_change=true to continue with the new ones (noted in "
                                      "config-changes.jsonl)")
            refused.same_on_every_rank = True  # every rank compares the same two configs: say it once
            raise refused
        log.info(f"resuming {path} with changed values: {listed} (noted in config-changes.jsonl)")
        self.record_change(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "checkpoint": str(path),
                                       "changes": {k: list(v) for k, v in changes.items()}}) + "\n")

    def _this_ranks_share(self, state: dict) -> dict:
        """The same world size continues each rank's RNG and sums exactly. Another world size cannot:
        random streams restart from the seed (a warning says so) and the sums, being additive, go to
        the main rank. The data position itself re-shards on any world size (data.TrainSampler)."""
        ranks = state["ranks"]
        if state["world_size"] == self.world.world_size:
            share = dict(ranks[self.world.rank])
            set_rng_state(share.pop("rng"))
            return share
        log.warning(f"resuming {state['world_size']} ranks' checkpoint on {self.world.world_size} "
                    "ranks: data continues from the saved position, random streams are re-seeded")
        seed_everything(self.seed + self.world.rank + state["step"])
        keys = [k for k in ranks[0] if k != "rng"]
        return {k: sum(r[k] for r in ranks) * (1 if self.world.is_main else 0) for k in keys}
