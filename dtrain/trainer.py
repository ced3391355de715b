"""The training loop. Read `Trainer.fit` top to bottom: the parts come built (dtrain/build.py), how the model
is wrapped and stepped is the strategy's (dtrain/strategy), what is learned and measured is the task's
(dtrain/tasks), extensions are callbacks called from one place (dtrain/callbacks.py), and checkpointing, the
stop agreement and the step itself stay here."""

from __future__ import annotations

import json
import math
import time
from typing import Any, Optional

import torch
from torch import nn

from dtrain import data, logs, optim, plots
from dtrain import world as w
from dtrain.build import Parts
from dtrain.callbacks import Callbacks
from dtrain.checkpointer import Checkpointer
from dtrain.config import Config, read_only
from dtrain.data import Loaders, Splits
from dtrain.errors import Diverged, Preempted
from dtrain.evaluation import evaluate, evaluate_own
from dtrain.logs import log
from dtrain.rundir import RunDir
from dtrain.signals import StopSignal
from dtrain.sinks import MetricLogger
from dtrain.stateful import Parts as CheckpointParts
from dtrain.stateful import Progress, RankState
from dtrain.stopping import StopVote
from dtrain.strategy import Strategy
from dtrain.steps import OwnStep, TaskStep, has_own_step
from dtrain.tasks import Task


class Trainer:
    """The loop over a run's parts. What callbacks may use of it (their documented view): `model` (the plain
    module), `optimizer`, `progress` (epoch, step), `world`, `run` (the run folder), `cfg` (read-only) and
    `should_stop` (set it to stop after this epoch, on every rank)."""

    def __init__(self, parts: Parts):
        self.config: Config = parts.cfg
        self.world: w.World = parts.world
        self.run: RunDir = parts.run
        self.splits: Splits = parts.splits
        self.task: Task = parts.task
        self.loaders: Loaders = parts.loaders
        self.model: nn.Module = parts.model  # the plain module: what is saved and evaluated
        self.net: nn.Module = parts.net  # what the forward runs on: the model wrapped for the world (and compiled)
        self.strategy: Strategy = parts.strategy
        self.optimizer: torch.optim.Optimizer = parts.optimizer
        self.scheduler: Any = parts.scheduler
        self.scaler: torch.amp.GradScaler = parts.scaler
        self.loss, self.custom_loss = parts.loss, parts.custom_loss  # custom: the user's (named in its errors)
        self.metrics: dict[str, Any] = parts.metrics
        self.callbacks: Callbacks = parts.callbacks
        self.logger: MetricLogger = parts.logger
        self.checkpointer: Checkpointer = parts.checkpointer
        self.steps_per_epoch, self.total_steps = parts.steps_per_epoch, parts.total_steps
        self.input_format: torch.memory_format = parts.input_format
        self.cfg = read_only(self.config)
        self.parameters = list(self.model.parameters())
        self.sync_every = self.config.trainer.sync_every_n_steps if self.world.distributed else 1  # alone: free
        self.stream = self.world.distributed and data.is_stream(self.splits.train)  # ranks end a pass together
        self.progress = Progress()
        self.step = make_step(self)
        self.unit = self.task.unit if isinstance(self.step, TaskStep) else "sample"  # what throughput counts
        self.stop_vote = StopVote(self.world, self.model, self.checkpointer.wait)
        self.should_stop = False  # a callback asks to stop after this epoch (the ranks agree)
        self.saved = checkpoint_parts(self)

    def fit(self) -> dict:
        try:
            return self._fit()
        except BaseException as error:  # a crash, or a stop signal (Preempted) after its checkpoint
            self.callbacks.call("on_exception", self, error)
            raise
        finally:
            self.callbacks.call("teardown", self)

    def _fit(self) -> dict:
        cfg, p = self.config, self.progress
        if self.checkpointer.resume(self.saved, cfg.resume):
            self.logger.rewind(p.step)  # epochs logged after this checkpoint will be run again
        train, val = (size(ld.dataset if ld is not None else None) for ld in (self.loaders.train, self.loaders.val))
        log.info(f"dtrain: model={cfg.model.name} data={cfg.data.name} ({train} train / {val} val samples) "
                 f"{self.world.describe()} global_batch={cfg.data.batch_size} run_dir={self.run}")
        torch.autograd.set_detect_anomaly(cfg.debug.detect_anomaly)
        stop = StopSignal(cfg.trainer.stop_grace_s)
        start, train_time, train_samples, train_units, val, first_step = time.perf_counter(), 0.0, 0, 0.0, None, p.step
        self.callbacks.call("on_fit_start", self)
        self.callbacks.check_state()  # before any epoch is spent: every checkpoint will hold it
        try:
            while p.epoch < cfg.trainer.epochs and not self.finished:
                t0, first = time.perf_counter(), p.step
                self.callbacks.call("on_train_epoch_start", self)
                train = self.train_epoch(stop)
                check_finite(train["loss"], p, self.world, "mean training loss of the epoch")
                epoch_time = time.perf_counter() - t0
                train_time, train_samples = train_time + epoch_time, train_samples + train["samples"]
                train_units += train["units"]
                val = self.validate()
                self.log_epoch(train, val, epoch_time, p.step - first)
                self.agree_to_stop()
                if train["complete"]:  # else max_steps stopped it part-way: keep the position
                    p.epoch, p.samples_in_epoch = p.epoch + 1, 0
                if self.checkpointer.should_save(p.step, p.epoch, epoch_end=True,
                                                 last=self.finished or p.epoch == cfg.trainer.epochs):
                    self.checkpointer.save(self.saved, p.step, val)
            self.checkpointer.wait()  # a save still being written in the background completes first
        except Preempted as stopped:
            self.checkpointer.save_on_stop(self.saved, p.step, stopped)
            stop.hand_on(stopped.signum)
            raise
        finally:
            stop.restore()
            torch.autograd.set_detect_anomaly(False)
        return finish(self, val, wall=time.perf_counter() - start,
                      samples_per_sec=train_samples / max(train_time, 1e-9),
                      units_per_sec=train_units / max(train_time, 1e-9),
                      step_time_s=train_time / max(self.progress.step - first_step, 1))

    last_metrics = property(lambda self: self.logger.last_epoch)  # the last epoch's record

    @property
    def finished(self) -> bool:
        return self.progress.step >= self.total_steps or self.should_stop

    def train_epoch(self, stop: StopSignal) -> dict:
        cfg, p, world = self.config, self.progress, self.world
        accum, every = cfg.trainer.accumulate_grad_batches, cfg.trainer.val_every_n_steps  # every: validate mid-epoch
        batches = self.steps_per_epoch * accum
        self.loaders.train.set_position(p.epoch, p.samples_in_epoch)
        if p.samples_in_epoch == 0:
            self.step.sums.reset()
        done = p.samples_in_epoch // cfg.data.batch_size  # micro-batches already trained this epoch
        self.net.train()
        ended = Ended()
        for batch in in_step(self.loaders.train, self.world, self.stream, ended):
            if done >= batches or self.finished:
                break
            done += 1
            boundary = done % accum == 0
            with self.strategy.no_sync(self.net, sync=boundary):  # micro-steps accumulate, the last reduces
                with self.strategy.autocast():
                    loss, kept = self.step.forward(batch)
                if cfg.debug.detect_anomaly and not torch.isfinite(loss):
                    raise Diverged(f"the training loss is {loss.item()} at epoch {p.epoch + 1} step {p.step} batch "
                                   f"{done - 1} (rank {world.rank}); debug=anomaly stopped at this first bad batch")
                penalty = optim.l1_penalty(self.parameters, cfg.optim.l1)  # None unless optim.l1 > 0
                objective = loss if penalty is None else loss + penalty
                self.scaler.scale(objective / accum if accum > 1 else objective).backward()
            self.stop_vote.settle()  # the ranks' vote started after the last step, read before this one counts
            self.step.keep(loss, kept)
            if not boundary:
                continue
            self.optimizer_step()
            p.samples_in_epoch = done * cfg.data.batch_size
            self.logger.advance(p.step, p.epoch)
            if self.callbacks.has("on_train_batch_end"):
                self.callbacks.call("on_train_batch_end", self, {"loss": loss.detach()})
            # The only host syncs of a step, and only every N steps: reading the loss, agreeing on a stop.
            if p.step % cfg.trainer.log_every_n_steps == 0:
                self.log_step(loss.item(), **({} if penalty is None else {"l1_penalty": penalty.item()}))
            if p.step % self.sync_every == 0:
                self.stop_vote.start(stop.received or 0, self.checkpointer.failed)
            if every and p.step % every == 0 and done < batches and not self.finished:
                self.validate_mid_epoch()  # an epoch's last step is validated at its end
            if not self.finished and done < batches and self.checkpointer.saved_step != p.step and \
                    self.checkpointer.should_save(p.step, p.epoch, epoch_end=False):
                self.checkpointer.save(self.saved, p.step)  # a step that ends the epoch is saved there, once
        self.stop_vote.settle()  # stepping ended with a vote in flight: a stop now is after the last step
        if done % accum:  # a stream that ended part-way through an accumulation: that step is not taken
            self.optimizer.zero_grad(set_to_none=True)
        return {**self.step.sums.reduce(self.strategy.dp.group), "complete": done >= batches or ended.now}

    def optimizer_step(self) -> None:
        if self.config.trainer.grad_clip:
            self.scaler.unscale_(self.optimizer)
            self.strategy.clip_grad_norm(self.parameters, self.config.trainer.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.progress.step += 1

    def validate(self) -> dict:
        if self.loaders.val is None:  # a stream without a "val" split: nothing to validate (said at the start)
            return {}
        self.strategy.sync_buffers(self.model)  # every rank evaluates and saves rank 0's model
        val = self.evaluate(self.loaders.val)
        self.callbacks.call("on_validation_end", self, val)
        return val

    def agree_to_stop(self) -> None:
        if self.world.distributed:  # any rank's callback may have asked to stop: all stop together
            self.should_stop = bool(w.max_over_ranks(int(self.should_stop), self.world.device))

    def validate_mid_epoch(self) -> None:
        """trainer.val_every_n_steps: its line, the stop agreement, and a checkpoint that may become the best."""
        p, val = self.progress, self.validate()
        self.logger.validation({"epoch": p.epoch + 1, "step": p.step, "lr": self.scheduler.get_last_lr()[0],
                                **{f"val_{k}": v for k, v in reported(val).items()}})
        self.agree_to_stop()
        if self.checkpointer.enabled:
            self.checkpointer.save(self.saved, p.step, val)

    def log_step(self, loss: float, **extra: float) -> None:
        p = self.progress
        check_finite(loss, p, self.world)
        metrics = {"epoch": p.epoch + 1, "step": p.step, "loss": loss, **extra, "lr": self.scheduler.get_last_lr()[0]}
        self.callbacks.call("on_log_step", self, metrics)
        self.logger.step(metrics)

    def evaluate(self, loader, name: str = "val") -> dict:
        return evaluate_split(self, loader, name)

    def log_epoch(self, train: dict, val: dict, epoch_time: float, steps: int) -> None:
        penalty = optim.l1_penalty(self.parameters, self.config.optim.l1)
        unit = self.unit
        metrics = {"epoch": self.progress.epoch + 1, "step": self.progress.step,  # epochs count from 1
                   **{f"train_{k}": v for k, v in reported(train).items()},
                   **({} if penalty is None else {"l1_penalty": penalty.item()}),
                   **{f"val_{k}": v for k, v in reported(val).items()},
                   "lr": self.scheduler.get_last_lr()[0], "epoch_time_s": epoch_time,
                   "samples_per_sec": train["samples"] / max(epoch_time, 1e-9),
                   **({f"{unit}s_per_sec": train["units"] / max(epoch_time, 1e-9)} if unit != "sample" else {}),
                   "step_time_s": epoch_time / max(steps, 1), "checkpoint_stall_s": self.checkpointer.take_stall()}
        self.callbacks.call("on_train_epoch_end", self, metrics)
        self.logger.epoch(metrics)

    def close(self) -> None:
        self.logger.close()
        self.loaders.close()  # their workers now, not at garbage collection (see data.loaders.shut_down_workers)


def evaluate_split(t: Trainer, loader, name: str) -> dict:
    """A split's metrics: the model's own validation_step (else its training_step's loss), or the task's."""
    common = dict(limit=t.config.debug.limit_batches, lockstep=t.strategy.lockstep_forward,
                  bar=lambda items: t.logger.bar(items, name, size(loader)), group=t.strategy.dp.group)
    if isinstance(t.step, OwnStep):
        return evaluate_own(t.model, lambda method, batch: getattr(t.model, method)(batch), loader, t.world,
                            t.strategy.autocast, **common)
    return evaluate(t.model, loader, t.task, t.world, t.strategy.autocast, t.loss, classes=t.splits.out,
                    extra=t.metrics, **common)


def checkpoint_parts(t: Trainer) -> CheckpointParts:
    """What a checkpoint holds (dtrain/stateful.py): the loop's own state is its progress."""
    stream = t.loaders.train if data.is_stream(t.splits.train) else None  # each rank's position in its share
    return CheckpointParts(t.model, t.optimizer, t.strategy, {
        "scheduler": t.scheduler, "scaler": t.scaler, "progress": t.progress, "callbacks": t.callbacks,
        "logger": t.logger, "ranks": RankState(t.world, t.config.seed, t.progress, t.step.sums, stream, t.strategy.dp)})


def size(items) -> object:
    """len(items), or "a stream of" where it has none."""
    try:
        return len(items)
    except TypeError:
        return "a stream of" if items is not None else 0


class Ended:
    now = False  # whether the loader's pass ended (rather than the loop stopping it)


def in_step(batches, world: w.World, agree: bool, ended: Ended):
    """The loader's batches. `agree` (a stream on several ranks, whose shares may end at different steps): the
    ranks agree before each batch that every one has one, and all stop at the first rank's end (no hang, no
    item trained twice; one tiny all-reduce a step)."""
    it = iter(batches)
    while True:
        batch = next(it, None)
        missing = bool(w.max_over_ranks(int(batch is None), world.device)) if agree else batch is None
        if missing:
            ended.now = True
            return
        yield batch


def make_step(t: Trainer) -> TaskStep | OwnStep:
    """The model's own step where it has one, else the task's, each run through the strategy's wrapped module."""
    if has_own_step(t.model):
        return OwnStep(lambda name, batch: t.strategy.method(t.net, t.model, name)(batch), t.world.device)
    return TaskStep(t.strategy.method(t.net, t.model, "forward"), t.model, t.task, t.loss, t.custom_loss, t.metrics,
                    t.splits.out, t.world.device, t.input_format)


def reported(metrics: dict) -> dict[str, float]:
    """What a metrics dict reports as train_NAME / val_NAME: its numbers, not its counts or its matrices."""
    return {k: v for k, v in metrics.items()
            if k not in ("samples", "units", "complete") and isinstance(v, (int, float))}


def check_finite(loss: float, p: Progress, world: w.World, what: str = "training loss") -> None:
    """Stop at a NaN or infinite loss, naming where (DDP averages gradients, so every rank's loss turns
    non-finite together): checked on log steps and for every epoch, so before any checkpoint of it."""
    if not math.isfinite(loss):
        raise Diverged(f"the {what} is {loss} at epoch {p.epoch + 1} step {p.step} (rank {world.rank}); lower "
                       "optim.lr, set trainer.grad_clip, or find the first bad batch with debug=anomaly")


def finish(t: Trainer, val: Optional[dict], **timing: float) -> dict:
    """The end of a run: the final validation (and test), summary.json, the sinks' summaries, the report."""
    if val is None and t.run.summary.exists():  # resumed a run that had already finished
        log.info(f"the run in {t.run} had already finished at step {t.progress.step}; its summary is kept")
        return json.loads(t.run.summary.read_text())
    stopped_early = t.should_stop
    if val is None:  # finished, but killed before its summary: the final validation again
        val = t.validate()
    test = t.evaluate(t.loaders.test, "test") if t.loaders.test is not None else None
    summary = summary_of(t, val, test, stopped_early, **timing)
    t.callbacks.call("on_fit_end", t, summary)
    t.run.write_summary(summary)
    t.logger.summary(summary)
    logs.report(summary, outputs(t))
    return summary


def summary_of(t: Trainer, val: dict, test: Optional[dict], stopped_early: bool, **timing: float) -> dict:
    """summary.json: what was trained, the final metrics, the best checkpoint, speed and the world."""
    cfg, p = t.config, t.progress
    return {"config_name": cfg.name, "model": cfg.model.name, "data": cfg.data.name,
            "epochs": p.epoch + (1 if p.samples_in_epoch else 0), "steps": p.step,  # an epoch max_steps cut counts
            "train_loss": (t.logger.last_epoch or {}).get("train_loss"),
            **{f"val_{k}": v for k, v in reported(val).items()}, "val_samples": val.get("samples", 0),
            **({f"test_{k}": v for k, v in reported(test).items()} if test is not None else {}),
            **t.splits.baselines, "monitor": t.checkpointer.monitor, "best": t.checkpointer.best,
            "stopped_early": stopped_early,
            "best_checkpoint": t.checkpointer.best_name(), "wall_time_s": timing["wall"],
            "samples_per_sec": timing["samples_per_sec"], "step_time_s": timing["step_time_s"],
            **({f"{t.unit}s_per_sec": timing["units_per_sec"]} if t.unit != "sample" else {}),
            "world_size": t.world.world_size, "num_nodes": t.world.num_nodes, "device": str(t.world.device),
            "precision": cfg.trainer.precision.value, "optimizer_implementation": optim.implementation_of(t.optimizer),
            "run_dir": str(t.run)}


def outputs(trainer: Trainer) -> dict[str, str]:
    """Where a run's results are, for the report."""
    run, ckpt = trainer.run, trainer.checkpointer.folder
    found = {"run": str(run), "ckpt": str(ckpt) if ckpt.exists() else "",
             "plots": " ".join(name for name in plots.PLOTS if (run.path / name).exists()),
             "tb": "tensorboard --logdir " + str(run.path / "tensorboard") if trainer.config.logger.tensorboard else ""}
    return {k: v for k, v in found.items() if v}
