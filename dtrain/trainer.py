"""The training loop. Read `Trainer.fit` top to bottom: everything else is a small call from it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from dtrain import data, logs, models, optim, perf, plots
from dtrain import world as w
from dtrain.checkpoint import Checkpointer, seed_everything
from dtrain.config import Config, Precision, as_dict
from dtrain.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, ConfigError, Preempted
from dtrain.logs import Context, MetricLogger, log
from dtrain.rundir import RunDir
from dtrain.signals import StopSignal
from dtrain.tasks import TASKS, EpochSums, autocast, evaluate, predict_samples


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""
    epoch: int = 0
    step: int = 0  # optimizer steps taken
    samples_in_epoch: int = 0  # global samples of the current epoch already trained on


@dataclass
class EarlyStopping:
    """Stop once the monitored validation metric has gone `patience` validations in a row without beating
    its best by more than `min_delta` (patience 0: never). Saved in every checkpoint."""
    patience: int
    min_delta: float
    higher_is_better: bool
    best: Optional[float] = None
    bad: int = 0  # validations in a row without improvement
    stopped: bool = False

    def update(self, value: float) -> bool:
        """Take one validation's value; whether training should stop."""
        if self.patience:
            gain = math.inf if self.best is None else \
                (value - self.best if self.higher_is_better else self.best - value)
            if gain > self.min_delta:  # NaN never improves
                self.best, self.bad = value, 0
            else:
                self.bad += 1
        return self.bad >= self.patience > 0


class Trainer:
    def __init__(self, cfg: Config, world: w.World, run: RunDir):
        self.cfg, self.world, self.run = cfg, world, run
        tc, dbg = cfg.trainer, cfg.debug
        seed_everything(cfg.seed)  # same initial weights on every rank (DDP broadcasts rank 0's anyway)
        splits = self.splits = data.build(cfg.data, world)
        self.task = TASKS[splits.task]
        self.input_format = perf.memory_format(tc.channels_last, splits.shape)
        self.model = models.build(cfg.model, splits.task, splits.shape, splits.out, cfg.data.name)
        if cfg.model.init_from:  # before DDP, which starts every rank from rank 0's weights
            models.init_from(self.model, cfg.model.name, cfg.model.init_from)
        self.model.to(world.device, memory_format=self.input_format)
        ddp_options = {k: v for k, v in dataclasses.asdict(cfg.dist).items() if k not in ("backend", "timeout_s")}
        self.net = w.wrap_model(self.model, world, cfg.model.sync_batchnorm, ddp_options)
        perf.set_tf32(tc.tf32)
        self.forward = torch.compile(self.net) if tc.compile else self.net
        # fp16 only: its narrow range makes small gradients underflow unless the loss is scaled up first.
        self.scaler = torch.amp.GradScaler(world.device.type, enabled=tc.precision == Precision.fp16)
        self.sync_every = tc.sync_every_n_steps if world.distributed else 1  # a local check costs nothing
        seed_everything(cfg.seed + world.rank)  # ranks draw different augmentation/dropout noise
        self.loaders = data.loaders(splits, cfg, world)

        batches = min(dbg.limit_batches or len(self.loaders.train), len(self.loaders.train))
        self.steps_per_epoch = batches // tc.accumulate_grad_batches
        if self.steps_per_epoch < 1:
            raise ConfigError(f"trainer.accumulate_grad_batches={tc.accumulate_grad_batches} exceeds the "
                              f"{batches} batches of an epoch; lower it or data.batch_size")
        self.total_steps = self.steps_per_epoch * tc.epochs
        if tc.max_steps > 0:
            self.total_steps = min(self.total_steps, tc.max_steps)
        self.parameters = list(self.model.parameters())
        self.optimizer = optim.build_optimizer(self.parameters, cfg.optim)
        self.scheduler = optim.build_scheduler(self.optimizer, cfg.sched, cfg.optim.lr, self.total_steps,
                                               self.steps_per_epoch)
        self.progress = Progress()
        self.last_metrics: Optional[dict] = None
        self.epoch_sums = EpochSums(self.task, world.device)  # this rank's, kept across a mid-epoch resume
        monitor = self.task.monitor_for(cfg.checkpoint.monitor, cfg.data.name)
        self.early = EarlyStopping(tc.early_stopping.patience, tc.early_stopping.min_delta,
                                   self.task.higher_is_better(monitor))
        self.checkpointer = Checkpointer(run.checkpoints, cfg.checkpoint, world,
                                         enabled=not dbg.limit_batches and not dbg.overfit_batches,
                                         monitor=monitor, higher_is_better=self.task.higher_is_better(monitor),
                                         seed=cfg.seed, config=as_dict(cfg),
                                         record_change=lambda line: run.write_text(run.config_changes, line, True))
        samples_per_step = cfg.data.batch_size * tc.accumulate_grad_batches
        self.metrics = MetricLogger(world, run, cfg.logger,
                                    Context(cfg.name, as_dict(cfg), tc.epochs, self.total_steps, samples_per_step))
        self.flops_per_sample = perf.training_flops_per_sample(self.model, splits.shape, world.device)
        self.peak_flops = perf.peak_flops(world.device, tc.precision != Precision.fp32)
        self.profiler = perf.profiler(run.track(run.path / "profile") if tc.profile else None, world.rank,
                                      world.device)

    # -- the loop -----------------------------------------------------------------------------------

    def fit(self) -> dict:
        cfg, p = self.cfg, self.progress
        if self.checkpointer.resume(self, cfg.resume):
            self.metrics.rewind(p.step)  # epochs logged after this checkpoint will be run again
        log.info(f"dtrain: model={cfg.model.name} data={cfg.data.name} "
                 f"({len(self.loaders.train.dataset)} train / {len(self.loaders.val.dataset)} val samples) "
                 f"{self.world.describe()} global_batch={cfg.data.batch_size} run_dir={self.run}")
        torch.autograd.set_detect_anomaly(cfg.debug.detect_anomaly)
        stop = StopSignal(cfg.trainer.stop_grace_s)
        start, train_time, train_samples, val, first_step = time.perf_counter(), 0.0, 0, None, p.step
        try:
            with self.profiler:  # a no-op unless trainer.profile=true
                while p.epoch < cfg.trainer.epochs and not self.finished:
                    t0, first = time.perf_counter(), p.step
                    train = self.train_epoch(stop)
                    epoch_time = time.perf_counter() - t0
                    train_time, train_samples = train_time + epoch_time, train_samples + train["samples"]
                    w.broadcast_buffers(self.model)  # every rank evaluates and saves rank 0's model
                    val = self.evaluate(self.loaders.val)
                    self.log_epoch(train, val, epoch_time, p.step - first)
                    self.early_stop(val)
                    if train["complete"]:  # else max_steps stopped it part-way: keep the position
                        p.epoch, p.samples_in_epoch = p.epoch + 1, 0
                    if self.checkpointer.should_save(p.step, p.epoch, epoch_end=True,
                                                     last=self.finished or p.epoch == cfg.trainer.epochs):
                        self.checkpointer.save(self, p.step, val)
        except Preempted as stopped:
            self.checkpointer.save_on_stop(self, p.step, stopped)
            stop.hand_on(stopped.signum)
            raise
        finally:
            stop.restore()
            torch.autograd.set_detect_anomaly(False)
        return self.finish(val, time.perf_counter() - start, train_samples / max(train_time, 1e-9),
                           train_time / max(self.progress.step - first_step, 1))

    @property
    def epochs_trained(self) -> int:
        """Epochs trained, counting one that trainer.max_steps ended part-way (people count from 1)."""
        return self.progress.epoch + (1 if self.progress.samples_in_epoch else 0)

    @property
    def finished(self) -> bool:
        return self.progress.step >= self.total_steps or self.early.stopped

    def early_stop(self, val: dict) -> None:
        """trainer.early_stopping: take this epoch's validation; every rank stops together."""
        if not self.early.patience:
            return
        metric = self.checkpointer.monitor
        # Validation metrics are reduced over all ranks, so ranks agree already; the max makes it certain.
        self.early.stopped = bool(w.max_over_ranks(int(self.early.update(val[metric.removeprefix("val_")])),
                                                   self.world.device))
        if self.early.stopped:
            log.info(f"early stopping: {metric} has not improved by more than {self.early.min_delta:g} for "
                     f"{self.early.bad} validations (best {self.early.best:.6g}); stopping after epoch "
                     f"{self.progress.epoch + 1} of {self.cfg.trainer.epochs}")

    def train_epoch(self, stop: StopSignal) -> dict:
        cfg, p, world = self.cfg, self.progress, self.world
        accum = cfg.trainer.accumulate_grad_batches
        self.loaders.train.set_position(p.epoch, p.samples_in_epoch)
        if p.samples_in_epoch == 0:
            self.epoch_sums.reset()
        done = p.samples_in_epoch // cfg.data.batch_size  # micro-batches already trained this epoch
        self.net.train()
        for x, y in self.loaders.train:
            if done >= self.steps_per_epoch * accum or self.finished:
                break
            done += 1
            x = x.to(world.device, non_blocking=True, memory_format=self.input_format)
            y = y.to(world.device, non_blocking=True)
            boundary = done % accum == 0
            # Micro-steps skip DDP's gradient all-reduce; the step's last micro-batch syncs them all.
            with (self.net.no_sync() if world.distributed and not boundary else contextlib.nullcontext()):
                with autocast(world.device, cfg.trainer.precision):
                    out = self.forward(x)
                    loss = self.task.loss(out.float(), y, cfg.trainer.label_smoothing)
                if cfg.debug.detect_anomaly and not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite loss {loss.item()} at epoch {p.epoch + 1} step {p.step} batch {done - 1} "
                        f"(rank {world.rank}); debug=anomaly stopped here")
                penalty = optim.l1_penalty(self.parameters, cfg.optim.l1)  # None unless optim.l1 > 0
                objective = loss if penalty is None else loss + penalty
                self.scaler.scale(objective / accum if accum > 1 else objective).backward()
            self.epoch_sums.add(loss, out, y)
            if not boundary:
                continue
            self.optimizer_step()
            p.samples_in_epoch = done * cfg.data.batch_size
            self.metrics.advance(p.step, p.epoch)
            self.profiler.step()
            # The only host syncs of a step, and only every N steps: reading the loss, agreeing on a stop.
            if p.step % cfg.trainer.log_every_n_steps == 0:
                self.log_step(loss.item(), **({} if penalty is None else {"l1_penalty": penalty.item()}))
            if p.step % self.sync_every == 0:
                signum = w.max_over_ranks(stop.received or 0, world.device)
                if signum:
                    raise Preempted(signum, EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_PREEMPTED)
            epoch_ends = done >= self.steps_per_epoch * accum  # then the epoch's end decides, with validation
            if not self.finished and not epoch_ends and self.checkpointer.should_save(p.step, p.epoch, epoch_end=False):
                self.checkpointer.save(self, p.step)
        return {**self.task.reduce(self.epoch_sums.value()), "complete": done >= self.steps_per_epoch * accum}

    def log_step(self, loss: float, **extra: float) -> None:
        p = self.progress
        if not math.isfinite(loss):  # DDP averages gradients, so every rank's loss turns non-finite together
            raise FloatingPointError(f"the training loss is {loss} at epoch {p.epoch + 1} step {p.step} (rank "
                                     f"{self.world.rank}); lower optim.lr, set trainer.grad_clip, or find the first "
                                     "bad batch with debug=anomaly")
        self.metrics.step({"epoch": p.epoch + 1, "step": p.step, "loss": loss, **extra,
                           "lr": self.scheduler.get_last_lr()[0]})

    def optimizer_step(self) -> None:
        if self.cfg.trainer.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.parameters, self.cfg.trainer.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.progress.step += 1

    def evaluate(self, loader, name: str = "val") -> dict:
        tc = self.cfg.trainer
        return evaluate(self.model, loader, self.task, self.world, tc.precision, tc.label_smoothing,
                        self.cfg.debug.limit_batches, classes=self.splits.out if self.task.classifies else 0,
                        bar=lambda batches: self.metrics.bar(batches, name, len(loader)))

    def log_epoch(self, train: dict, val: dict, epoch_time: float, steps: int) -> None:
        penalty = optim.l1_penalty(self.parameters, self.cfg.optim.l1)
        self.last_metrics = {"epoch": self.progress.epoch + 1, "step": self.progress.step,  # epochs count from 1
                             **{f"train_{k}": train[k] for k in self.task.metrics},
                             **({} if penalty is None else {"l1_penalty": penalty.item()}),
                             **{f"val_{k}": val[k] for k in self.task.eval_metrics},
                             "lr": self.scheduler.get_last_lr()[0], "epoch_time_s": epoch_time,
                             **self.speed(train["samples"] / max(epoch_time, 1e-9), epoch_time / max(steps, 1))}
        self.metrics.epoch(self.last_metrics)

    def speed(self, samples_per_sec: float, step_time: float) -> dict:
        """Global training throughput; FLOP/s where the model's FLOPs could be counted, and model FLOP
        utilisation where the GPU's peak is known."""
        out = {"samples_per_sec": samples_per_sec, "step_time_s": step_time}
        if self.flops_per_sample:
            out["flops_per_sec"] = flops = self.flops_per_sample * samples_per_sec
            if self.peak_flops:
                out["mfu"] = flops / (self.peak_flops * self.world.world_size)
        return out

    def finish(self, val: Optional[dict], wall: float, samples_per_sec: float, step_time: float) -> dict:
        cfg, names = self.cfg, self.task.eval_metrics
        if val is None and self.run.summary.exists():  # resumed a run that had already finished
            log.info(f"the run in {self.run} had already finished at step {self.progress.step}; its summary is kept")
            return json.loads(self.run.summary.read_text())
        val = val or self.evaluate(self.loaders.val)  # None: finished, but killed before its summary
        summary = {"config_name": cfg.name, "model": cfg.model.name, "data": cfg.data.name,
                   "epochs": self.epochs_trained, "steps": self.progress.step,
                   "train_loss": (self.last_metrics or {}).get("train_loss"),
                   **{f"val_{k}": val[k] for k in names}, "val_samples": val["samples"]}
        if self.loaders.test is not None:
            test = self.evaluate(self.loaders.test, "test")
            summary.update({f"test_{k}": test[k] for k in names})
        summary.update(monitor=self.checkpointer.monitor, best=self.checkpointer.best, stopped_early=self.early.stopped,
                       wall_time_s=wall,
                       **self.speed(samples_per_sec, step_time), world_size=self.world.world_size,
                       num_nodes=self.world.num_nodes, device=str(self.world.device),
                       precision=cfg.trainer.precision.value, run_dir=str(self.run))
        self.run.write_summary(summary)
        self.metrics.summary(summary, self.details(val))
        logs.report(summary, self.outputs())
        return summary

    def details(self, val: dict) -> dict:
        """What the plots need beyond the metrics: the confusion matrix and a few predictions."""
        if not self.task.classifies or not self.cfg.logger.plots:
            return {}
        classes = self.splits.class_names or [str(i) for i in range(self.splits.out)]
        details = {"confusion": val["confusion"], "classes": classes}
        if len(self.splits.shape) == 3:  # images
            details["samples"] = {**predict_samples(self.model, self.loaders.val.dataset, self.world.device),
                                  "classes": classes}
        return details

    def outputs(self) -> dict[str, str]:
        """Where the run's results are, for the report."""
        found = {"run": str(self.run), "ckpt": str(self.checkpointer.folder) if self.checkpointer.folder.exists() else "",
                 "plots": " ".join(name for name in plots.PLOTS if (self.run.path / name).exists()),
                 "tb": "tensorboard --logdir " + str(self.run.path / "tensorboard") if self.cfg.logger.tensorboard else ""}
        return {k: v for k, v in found.items() if v}

    def close(self) -> None:
        self.metrics.close()

    # -- what a checkpoint holds (the Checkpointer decides when and how) ------------------------------

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                **dataclasses.asdict(self.progress), "model_name": self.cfg.model.name,
                "config": as_dict(self.cfg), "metrics": self.last_metrics, "logger": self.metrics.state_dict(),
                "data": self.splits.describe(), "early_stopping": dataclasses.asdict(self.early)}

    def rank_state(self) -> dict[str, torch.Tensor]:
        return {"epoch_sums": self.epoch_sums.value()}

    def load_state_dict(self, state: dict) -> None:
        try:
            models.load_weights(self.model, self.cfg.model.name, state["model"])
        except RuntimeError as e:
            raise ValueError(f"does not fit this model/data ({str(e).splitlines()[0]}); "
                             "resume=none starts fresh") from e
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        p = self.progress  # updated in place: the loop holds a reference to it
        p.epoch, p.step, p.samples_in_epoch = state["epoch"], state["step"], state["samples_in_epoch"]
        self.last_metrics = state["metrics"]
        self.metrics.load_state_dict(state.get("logger") or {})
        self.epoch_sums.reset(state["rank"]["epoch_sums"])
        saved = state.get("early_stopping") or {}  # what happened; patience and min_delta are this run's
        self.early.best, self.early.bad = saved.get("best"), saved.get("bad", 0)
        self.early.stopped = self.early.bad >= self.early.patience > 0  # given more patience, training goes on
