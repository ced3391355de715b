"""The training loop. Read `Trainer.fit` top to bottom: the parts come built (dtrain/build.py), how the model
is wrapped and stepped is the strategy's (dtrain/strategy), extensions are callbacks called from one place
(dtrain/callbacks.py), and checkpointing, the stop-signal agreement and the step itself stay here."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from dtrain import contracts, logs, optim, plots
from dtrain import world as w
from dtrain.build import Parts
from dtrain.checkpoint import rng_state, set_rng_state
from dtrain.config import as_dict
from dtrain.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, Diverged, Preempted
from dtrain.logs import log
from dtrain.signals import StopSignal
from dtrain.evaluation import evaluate
from dtrain.tasks import EpochSums


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    samples_in_epoch: int = 0  # global samples of the current epoch already trained on


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


class Trainer:
    def __init__(self, parts: Parts):
        self.parts = parts
        for f in dataclasses.fields(parts):
            setattr(self, f.name, getattr(parts, f.name))
        self.shape = self.splits.shape
        self.eval_names = (*self.task.eval_metrics, *self.metrics)  # val_*, test_*: the task's, then the user's
        self.forward = self.net  # what the step calls (tests and faults may wrap it)
        self.parameters = list(self.model.parameters())
        self.sync_every = self.cfg.trainer.sync_every_n_steps if self.world.distributed else 1  # local: free
        self.stop_vote = StopVote(self.world, self.model, self.checkpointer.wait)
        self.progress = Progress()
        self.epoch_sums = EpochSums(self.task, self.world.device)  # this rank's, kept across a mid-epoch resume
        self.last_metrics: Optional[dict] = None
        self.final_val: Optional[dict] = None
        self.should_stop = False  # a callback asks to stop after this epoch (the ranks agree)
        self.checked = False  # whether the first batch's outputs and loss were checked

    # -- the loop -----------------------------------------------------------------------------------

    def fit(self) -> dict:
        cfg, p = self.cfg, self.progress
        if self.checkpointer.resume(self, cfg.resume):
            self.logger.rewind(p.step)  # epochs logged after this checkpoint will be run again
        log.info(f"dtrain: model={cfg.model.name} data={cfg.data.name} "
                 f"({len(self.loaders.train.dataset)} train / {len(self.loaders.val.dataset)} val samples) "
                 f"{self.world.describe()} global_batch={cfg.data.batch_size} run_dir={self.run}")
        torch.autograd.set_detect_anomaly(cfg.debug.detect_anomaly)
        stop = StopSignal(cfg.trainer.stop_grace_s)
        start, train_time, train_samples, val, first_step = time.perf_counter(), 0.0, 0, None, p.step
        self.callbacks.call("on_fit_start", self)
        self.callbacks.check_state()  # before any epoch is spent: every checkpoint will hold it
        try:
            while p.epoch < cfg.trainer.epochs and not self.finished:
                t0, first = time.perf_counter(), p.step
                self.callbacks.call("on_train_epoch_start", self)
                train = self.train_epoch(stop)
                self.check_finite(train["loss"], "mean training loss of the epoch")
                epoch_time = time.perf_counter() - t0
                train_time, train_samples = train_time + epoch_time, train_samples + train["samples"]
                self.strategy.sync_buffers(self.model)  # every rank evaluates and saves rank 0's model
                val = self.evaluate(self.loaders.val)
                self.callbacks.call("on_validation_end", self, val)
                self.log_epoch(train, val, epoch_time, p.step - first)
                if self.world.distributed:  # any rank's callback may have asked to stop: all stop together
                    self.should_stop = bool(w.max_over_ranks(int(self.should_stop), self.world.device))
                if train["complete"]:  # else max_steps stopped it part-way: keep the position
                    p.epoch, p.samples_in_epoch = p.epoch + 1, 0
                if self.checkpointer.should_save(p.step, p.epoch, epoch_end=True,
                                                 last=self.finished or p.epoch == cfg.trainer.epochs):
                    self.checkpointer.save(self, p.step, val)
            self.checkpointer.wait()  # a save still being written in the background completes first
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
    def finished(self) -> bool:
        return self.progress.step >= self.total_steps or self.should_stop

    def train_epoch(self, stop: StopSignal) -> dict:
        cfg, p, world = self.cfg, self.progress, self.world
        accum, batches = cfg.trainer.accumulate_grad_batches, self.steps_per_epoch * cfg.trainer.accumulate_grad_batches
        self.loaders.train.set_position(p.epoch, p.samples_in_epoch)
        if p.samples_in_epoch == 0:
            self.epoch_sums.reset()
        done = p.samples_in_epoch // cfg.data.batch_size  # micro-batches already trained this epoch
        self.net.train()
        for x, y in self.loaders.train:
            if done >= batches or self.finished:
                break
            done += 1
            x = x.to(world.device, non_blocking=True, memory_format=self.input_format)
            y = y.to(world.device, non_blocking=True)
            boundary = done % accum == 0
            with self.strategy.no_sync(self.net, sync=boundary):  # micro-steps accumulate, the last reduces
                with self.strategy.autocast():
                    out = self.forward(x)
                    if not self.checked:  # the first batch: what the model, loss and metrics give fits the task
                        self.check_first_batch(out, y)
                    loss = self.loss(out.float(), y)
                if not self.checked:
                    contracts.check_loss(loss, self.loss, self.custom_loss)
                    self.checked = True
                if cfg.debug.detect_anomaly and not torch.isfinite(loss):
                    raise Diverged(f"the training loss is {loss.item()} at epoch {p.epoch + 1} step {p.step} batch "
                                   f"{done - 1} (rank {world.rank}); debug=anomaly stopped at this first bad batch")
                penalty = optim.l1_penalty(self.parameters, cfg.optim.l1)  # None unless optim.l1 > 0
                objective = loss if penalty is None else loss + penalty
                self.scaler.scale(objective / accum if accum > 1 else objective).backward()
            self.stop_vote.settle()  # the ranks' vote started after the last step, read before this one counts
            self.epoch_sums.add(loss, out, y)
            if not boundary:
                continue
            self.optimizer_step()
            p.samples_in_epoch = done * cfg.data.batch_size
            self.logger.advance(p.step, p.epoch)
            # The only host syncs of a step, and only every N steps: reading the loss, agreeing on a stop.
            if p.step % cfg.trainer.log_every_n_steps == 0:
                self.log_step(loss.item(), **({} if penalty is None else {"l1_penalty": penalty.item()}))
            if p.step % self.sync_every == 0:
                self.stop_vote.start(stop.received or 0, self.checkpointer.failed)
            if not self.finished and done < batches and self.checkpointer.should_save(p.step, p.epoch,
                                                                                      epoch_end=False):
                self.checkpointer.save(self, p.step)  # a step that ends the epoch is saved there, once
        self.stop_vote.settle()  # stepping ended with a vote in flight: a stop now is after the last step
        return {**self.task.reduce(self.epoch_sums.value(), self.strategy.dp.group), "complete": done >= batches}

    def check_first_batch(self, out, y: torch.Tensor) -> None:
        contracts.check_outputs(self.model, out, y, self.task.check, self.splits.out)
        contracts.check_metrics(self.metrics, out, y)

    def optimizer_step(self) -> None:
        if self.cfg.trainer.grad_clip:
            self.scaler.unscale_(self.optimizer)
            self.strategy.clip_grad_norm(self.parameters, self.cfg.trainer.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.progress.step += 1

    def check_finite(self, loss: float, what: str = "training loss") -> None:
        """Stop at a NaN or infinite loss, naming where (DDP averages gradients, so every rank's loss turns
        non-finite together): checked on log steps and for every epoch, so before any checkpoint of it."""
        if not math.isfinite(loss):
            p = self.progress
            raise Diverged(f"the {what} is {loss} at epoch {p.epoch + 1} step {p.step} (rank {self.world.rank}); "
                           "lower optim.lr, set trainer.grad_clip, or find the first bad batch with debug=anomaly")

    def log_step(self, loss: float, **extra: float) -> None:
        p = self.progress
        self.check_finite(loss)
        metrics = {"epoch": p.epoch + 1, "step": p.step, "loss": loss, **extra, "lr": self.scheduler.get_last_lr()[0]}
        self.callbacks.call("on_log_step", self, metrics)
        self.logger.step(metrics)

    def evaluate(self, loader, name: str = "val") -> dict:
        return evaluate(self.model, loader, self.task, self.world, self.strategy.autocast, self.loss,
                        self.cfg.debug.limit_batches, classes=self.splits.out,
                        bar=lambda batches: self.logger.bar(batches, name, len(loader)), extra=self.metrics,
                        lockstep=self.strategy.lockstep_forward, group=self.strategy.dp.group)

    def log_epoch(self, train: dict, val: dict, epoch_time: float, steps: int) -> None:
        penalty = optim.l1_penalty(self.parameters, self.cfg.optim.l1)
        metrics = {"epoch": self.progress.epoch + 1, "step": self.progress.step,  # epochs count from 1
                   **{f"train_{k}": train[k] for k in self.task.metrics},
                   **({} if penalty is None else {"l1_penalty": penalty.item()}),
                   **{f"val_{k}": val[k] for k in self.eval_names},
                   "lr": self.scheduler.get_last_lr()[0], "epoch_time_s": epoch_time,
                   "samples_per_sec": train["samples"] / max(epoch_time, 1e-9),
                   "step_time_s": epoch_time / max(steps, 1), "checkpoint_stall_s": self.checkpointer.take_stall()}
        self.callbacks.call("on_train_epoch_end", self, metrics)
        self.last_metrics = metrics
        self.logger.epoch(metrics)

    def finish(self, val: Optional[dict], wall: float, samples_per_sec: float, step_time: float) -> dict:
        cfg, names, p = self.cfg, self.eval_names, self.progress
        if val is None and self.run.summary.exists():  # resumed a run that had already finished
            log.info(f"the run in {self.run} had already finished at step {self.progress.step}; its summary is kept")
            return json.loads(self.run.summary.read_text())
        self.final_val = val = val or self.evaluate(self.loaders.val)  # None: finished, but killed before its summary
        summary = {"config_name": cfg.name, "model": cfg.model.name, "data": cfg.data.name,  # epochs: one that
                   "epochs": p.epoch + (1 if p.samples_in_epoch else 0), "steps": p.step,  # max_steps cut counts
                   "train_loss": (self.last_metrics or {}).get("train_loss"),
                   **{f"val_{k}": val[k] for k in names}, "val_samples": val["samples"]}
        if self.loaders.test is not None:
            test = self.evaluate(self.loaders.test, "test")
            summary.update({f"test_{k}": test[k] for k in names})
        summary.update(monitor=self.checkpointer.monitor, best=self.checkpointer.best, stopped_early=self.should_stop,
                       best_checkpoint=self.checkpointer.best_name(),
                       wall_time_s=wall, samples_per_sec=samples_per_sec, step_time_s=step_time,
                       world_size=self.world.world_size, num_nodes=self.world.num_nodes, device=str(self.world.device),
                       precision=cfg.trainer.precision.value,
                       optimizer_implementation=optim.implementation_of(self.optimizer), run_dir=str(self.run))
        self.callbacks.call("on_fit_end", self, summary)
        self.run.write_summary(summary)
        self.logger.summary(summary)
        logs.report(summary, outputs(self))
        return summary

    def close(self) -> None:
        self.logger.close()

    # -- what a checkpoint holds (the Checkpointer decides when and how) ------------------------------

    def state_dict(self, weights: bool = True) -> dict:
        """Every rank calls it (a sharded model gathers); `weights=False`: all but the model and optimizer."""
        return {**(self.strategy.state(self.model, self.optimizer) if weights else {}),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                **dataclasses.asdict(self.progress), "model_name": self.cfg.model.name, "config": as_dict(self.cfg),
                "metrics": self.last_metrics, "logger": self.logger.state_dict(), "data": self.splits.describe(),
                "callbacks": self.callbacks.state_dict()}

    def rank_state(self) -> dict[str, torch.Tensor]:
        return {"epoch_sums": self.epoch_sums.value()}

    def load_state_dict(self, state: dict) -> None:
        try:
            self.strategy.load(self.model, self.optimizer, state, self.cfg.model.name)
        except (RuntimeError, KeyError) as e:
            raise ValueError(f"does not fit this model/data ({str(e).splitlines()[0]}); "
                             "resume=none starts fresh") from e
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        p = self.progress  # updated in place: the loop holds a reference to it
        p.epoch, p.step, p.samples_in_epoch = state["epoch"], state["step"], state["samples_in_epoch"]
        self.last_metrics = state["metrics"]
        self.logger.load_state_dict(state.get("logger") or {})
        self.epoch_sums.reset(state["rank"]["epoch_sums"])
        # Checkpoints before callbacks held early stopping's state under its own key.
        self.callbacks.load_state_dict(state.get("callbacks") or {"early_stopping": state.get("early_stopping") or {}})


def outputs(trainer: Trainer) -> dict[str, str]:
    """Where a run's results are, for the report."""
    run, ckpt = trainer.run, trainer.checkpointer.folder
    found = {"run": str(run), "ckpt": str(ckpt) if ckpt.exists() else "",
             "plots": " ".join(name for name in plots.PLOTS if (run.path / name).exists()),
             "tb": "tensorboard --logdir " + str(run.path / "tensorboard") if trainer.cfg.logger.tensorboard else ""}
    return {k: v for k, v in found.items() if v}
