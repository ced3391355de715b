"""When to checkpoint and what to resume from, for one run folder: the cadence, which checkpoint is the best,
saving on a stop signal, the resume choice and its checks (another model, changed training values). How the
parts are written and read, and failing together, is dtrain/saving.py's; the files themselves are
dtrain/checkpoint.py's contract."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

from dtrain import saving, signals
from dtrain import world as w
from dtrain.checkpoint import config_changes, find_resumable, follow_latest, load
from dtrain.config import CheckpointConfig
from dtrain.errors import CheckpointError, Preempted
from dtrain.logs import log
from dtrain.stateful import Parts
from dtrain.tasks import Best, monitored


class Checkpointer:
    """When to save, which checkpoint is the best, and what to resume from, for one run folder. `meta` is what
    every checkpoint records of the run (its model's name, config, data description, world size)."""

    def __init__(self, folder: Path, cfg: CheckpointConfig, world: w.World, enabled: bool, monitor: str,
                 higher_is_better: bool, meta: dict, record_change: Callable[[str], None], fmt: str = "file",
                 optional_monitor: bool = False):
        self.folder, self.cfg, self.world, self.enabled = folder, cfg, world, enabled and cfg.enabled
        self.monitor, self.higher_is_better, self.optional_monitor = monitor, higher_is_better, optional_monitor
        self.meta, self.record_change = meta, record_change  # what every checkpoint records; where changes go
        self.config = meta["config"]
        self.tracked = Best(higher_is_better)  # the monitored value of the best checkpoint
        self.fmt = fmt
        self.writer = saving.Writer(folder, cfg, world, fmt, self.enabled)
        self.stall_s = 0.0  # how long the loop waited on saves since `take_stall`
        self.saved_step: Optional[int] = None  # the step of the last save

    def should_save(self, step: int, epoch: int, *, epoch_end: bool, last: bool = False) -> bool:
        """At the end of training, every `every_n_epochs` epochs, every `every_n_steps` steps. At an epoch's
        end both cadences count, so a step that ends an epoch is saved once, with its validation."""
        by_step = bool(self.cfg.every_n_steps) and step % self.cfg.every_n_steps == 0
        by_epoch = epoch_end and bool(self.cfg.every_n_epochs) and epoch % self.cfg.every_n_epochs == 0
        return self.enabled and (last or by_step or by_epoch)

    def save(self, parts: Parts, step: int, val: Optional[dict] = None, wait: bool = False) -> None:
        """All ranks call this. `val` (the validation metrics, or None mid-epoch) decides whether this becomes
        the best; a NaN or infinite value never does."""
        start = time.perf_counter()
        value = monitored(val, self.monitor, self.optional_monitor) if val is not None else None
        is_best = value is not None and self.tracked.offer(value)
        self.writer.write(parts, step, is_best, {**self.meta, "step": step, "best": self.best}, wait)
        self.saved_step = step
        self.stall_s += time.perf_counter() - start

    @property
    def best(self) -> Optional[float]:
        return self.tracked.value

    @property
    def failed(self) -> bool:
        """Whether this rank knows a save in the background has failed (see saving.Writer.failed)."""
        return self.writer.failed

    def wait(self) -> None:
        """A save still being written in the background published; every rank fails together if it failed."""
        self.writer.wait()

    def best_name(self) -> Optional[str]:
        """What holds the best checkpoint in the folder: a file `best.pt`, a pointer `best`, or None."""
        return next((name for name in ("best", "best.pt") if (self.folder / name).exists()), None)

    def take_stall(self) -> float:
        """Seconds the loop waited on saves since the last call."""
        stall, self.stall_s = self.stall_s + self.writer.take_stall(), 0.0
        return stall

    def save_on_stop(self, parts: Parts, step: int, stop: Preempted) -> None:
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
            self.save(parts, step, wait=True)
        log.info(f"{why}: checkpoint saved; exiting with {stop.code}. To continue, run the same command with "
                 f"resume=last (the newest run of this config) or hydra.run.dir={self.folder.parent}")

    def resume(self, parts: Parts, resume: str) -> Optional[dict]:
        """Load `resume` (auto: the newest good checkpoint here, if any; none; a path) into `parts` on every
        rank. Returns the checkpoint's state, or None when starting fresh."""
        if resume == "none" or resume in ("auto", "last") and not self.enabled:
            return None
        if resume in ("auto", "last"):  # for last, the run folder already is the newest run's (rundir.folder_id)
            path = self._newest()
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
            saving.read(state, parts, self.config["model"]["name"])
        except (RuntimeError, KeyError, ValueError) as e:  # a file that loads but does not fit: one clear line
            why = (str(e).splitlines() or [""])[0]
            raise CheckpointError(f"checkpoint {path} does not fit this model/data ({why}); resume=none starts "
                                  "fresh") from e
        self._check_config(state["config"], path)
        self.tracked.value = state.get("best")
        progress = state["progress"]
        where = f"in epoch {progress['epoch'] + 1}" if progress["samples_in_epoch"] else \
            f"after epoch {progress['epoch']}"
        log.info(f"resumed from {path}: step {state['step']}, {where}")
        return state

    def _newest(self) -> Optional[str]:
        """The main rank picks the newest good checkpoint, so all ranks load the same one (or fail together)."""
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
        return path

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
