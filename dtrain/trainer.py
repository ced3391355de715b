"""The training loop. Read `Trainer.fit` top to bottom: everything else is a small call from it."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Subset

from dtrain import checkpoint as ckpt
from dtrain import data, models, optim
from dtrain import world as w
from dtrain.config import Config, ConfigError, as_dict
from dtrain.logs import MetricLogger, log

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: a checkpoint was saved on SIGTERM/SIGUSR1; requeue and resume


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def loss_function(task: str, label_smoothing: float) -> Callable[..., torch.Tensor]:
    if task == "classification":
        return lambda out, y, reduction="mean": F.cross_entropy(
            out, y, label_smoothing=label_smoothing, reduction=reduction)
    return lambda out, y, reduction="mean": F.mse_loss(out, y, reduction=reduction)


def autocast(device: torch.device, precision: str):
    if precision == "32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, loss_fn, task: str, world: w.World,
             precision: str = "32", limit: int = 0) -> dict[str, float]:
    """Loss (and accuracy) over the loader's samples on all ranks, each sample counted once."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=world.device)  # loss sum, correct, count
    for i, (x, y) in enumerate(loader):
        if limit and i >= limit:
            break
        x, y = x.to(world.device, non_blocking=True), y.to(world.device, non_blocking=True)
        with autocast(world.device, precision):
            out = model(x)
        sums[0] += loss_fn(out.float(), y, reduction="sum")
        if task == "classification":
            sums[1] += (out.argmax(1) == y).sum()
        sums[2] += len(y)
    model.train(was_training)
    return reduce_metrics(sums, task)


def reduce_metrics(sums: torch.Tensor, task: str) -> dict[str, float]:
    """(loss sum, correct, count) of this rank -> mean loss (and accuracy) over all ranks' samples."""
    loss_sum, correct, n = w.all_reduce_sum(sums.clone()).tolist()
    result = {"loss": loss_sum / max(n, 1), "samples": int(n)}
    if task == "classification":
        result["acc"] = correct / max(n, 1)
    return result


class StopSignal:
    """Records SIGTERM/SIGUSR1 (how SLURM and torchrun announce preemption or teardown) for the loop to
    act on at its next step. A rank stuck where the loop cannot act (a collective whose peer died) would
    never get there, so the first signal also arms a watchdog that exits after `grace_s`."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, grace_s: float):
        self.received: Optional[int] = None
        self.grace_s = grace_s
        self._watchdog: Optional[threading.Timer] = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            self._watchdog = threading.Timer(self.grace_s, self._expire, args=(signum,))
            self._watchdog.daemon = True
            self._watchdog.start()

    def _expire(self, signum: int) -> None:
        print(f"dtrain: no clean stop within trainer.stop_grace_s={self.grace_s:g}s of signal {signum} "
              "(stuck in a collective?); exiting", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    def restore(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        for s, h in self._previous.items():
            signal.signal(s, h)


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""
    epoch: int = 0
    step: int = 0  # optimizer steps taken
    samples_in_epoch: int = 0  # global samples of the current epoch already trained on
    best: Optional[float] = None


class Preempted(Exception):
    pass


class Trainer:
    def __init__(self, cfg: Config, world: w.World, run_dir: Path):
        self.cfg, self.world, self.run_dir = cfg, world, run_dir
        tc = cfg.trainer
        seed_everything(cfg.seed)  # same initial weights on every rank (DDP broadcasts rank 0's anyway)
        self.splits = data.build(cfg.data, world)
        self.task = self.splits.task
        self.model = models.build(cfg.model.name, self.task, self.splits.shape, self.splits.out,
                                  cfg.data.name).to(world.device)
        if cfg.model.sync_batchnorm and world.distributed:
            if world.device.type != "cuda":
                raise ConfigError("model.sync_batchnorm=true needs CUDA devices (PyTorch's SyncBatchNorm has no "
                                  "CPU implementation); set model.sync_batchnorm=false on CPU")
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.net: nn.Module = (DDP(self.model, device_ids=[world.device.index] if world.device.type == "cuda"
                                   else None) if world.distributed else self.model)
        self.forward = torch.compile(self.net) if tc.compile else self.net
        self.loss_fn = loss_function(self.task, tc.label_smoothing)
        self.scaler = torch.amp.GradScaler(world.device.type, enabled=tc.precision == "fp16")
        seed_everything(cfg.seed + world.rank)  # ranks draw different augmentation/dropout noise

        train_set, val_set = self.splits.train, self.splits.val
        dbg = cfg.debug
        if dbg.overfit_batches:  # a few fixed batches, trained on again and again, also validated on
            train_set = val_set = Subset(train_set, range(min(len(train_set), dbg.overfit_batches
                                                              * cfg.data.batch_size)))
        self.train_loader = data.train_loader(train_set, cfg, world, shuffle=not dbg.overfit_batches)
        self.val_loader = data.eval_loader(val_set, cfg, world)
        self.test_loader = (data.eval_loader(self.splits.test, cfg, world)
                            if self.splits.test is not None and not dbg.overfit_batches else None)

        batches = len(self.train_loader) if not dbg.limit_batches else min(dbg.limit_batches, len(self.train_loader))
        self.steps_per_epoch = batches // tc.accumulate_grad_batches
        if self.steps_per_epoch < 1:
            raise ConfigError(f"trainer.accumulate_grad_batches={tc.accumulate_grad_batches} exceeds the "
                              f"{batches} batches of an epoch; lower it or data.batch_size")
        self.total_steps = self.steps_per_epoch * tc.epochs
        if tc.max_steps > 0:
            self.total_steps = min(self.total_steps, tc.max_steps)
        self.optimizer = optim.build_optimizer(self.model.parameters(), cfg.optim)
        self.scheduler = optim.build_scheduler(self.optimizer, cfg.sched, cfg.optim.lr, self.total_steps,
                                               self.steps_per_epoch)
        self.progress = Progress()
        self.last_metrics: Optional[dict] = None
        self.ckpt_dir = run_dir / "checkpoints"
        self.save_checkpoints = cfg.checkpoint.enabled and not dbg.limit_batches and not dbg.overfit_batches
        self.monitor = cfg.checkpoint.monitor if cfg.checkpoint.monitor != "auto" else (
            "val_acc" if self.task == "classification" else "val_loss")
        if self.monitor == "val_acc" and self.task != "classification":
            raise ConfigError(f"checkpoint.monitor=val_acc but data={cfg.data.name} is a regression task; "
                              "use checkpoint.monitor=val_loss")
        self.metrics = MetricLogger(world, run_dir, cfg.logger)
        self._epoch_sums = torch.zeros(3, dtype=torch.float64, device=world.device)

    # -- the loop -----------------------------------------------------------------------------------

    def fit(self) -> dict:
        self.resume()  # may replace self.progress: bind `p` after it
        cfg, p = self.cfg, self.progress
        log.info(f"dtrain: model={cfg.model.name} data={cfg.data.name} "
                 f"({len(self.train_loader.dataset)} train / {len(self.val_loader.dataset)} val samples) "
                 f"{self.world.describe()} global_batch={cfg.data.batch_size} run_dir={self.run_dir}")
        if cfg.debug.detect_anomaly:
            torch.autograd.set_detect_anomaly(True)
        stop = StopSignal(cfg.trainer.stop_grace_s)
        start, train_time, train_samples, val = time.perf_counter(), 0.0, 0, None
        try:
            while p.epoch < cfg.trainer.epochs and not self.finished:
                t0 = time.perf_counter()
                train = self.train_epoch(stop)
                epoch_time = time.perf_counter() - t0
                train_time += epoch_time
                train_samples += train["samples"]
                w.broadcast_buffers(self.model)  # every rank evaluates and saves rank 0's model
                val = evaluate(self.model, self.val_loader, self.loss_fn, self.task, self.world,
                               cfg.trainer.precision, cfg.debug.limit_batches)
                self.log_epoch(train, val, epoch_time)
                if train["complete"]:  # else max_steps stopped it part-way: keep the position
                    p.epoch, p.samples_in_epoch = p.epoch + 1, 0
                if self.save_checkpoints and (self.finished or p.epoch == cfg.trainer.epochs or (
                        cfg.checkpoint.every_n_epochs and p.epoch % cfg.checkpoint.every_n_epochs == 0)):
                    self.save(val)
        except Preempted:
            self.save(None)
            log.warning(f"stopped by signal {stop.received}: checkpoint saved at step {p.step}; "
                        f"exiting with {PREEMPTED_EXIT_CODE} so the launcher can requeue and resume")
            raise
        finally:
            stop.restore()
            torch.autograd.set_detect_anomaly(False)
        return self.finish(val, time.perf_counter() - start, train_samples / max(train_time, 1e-9))

    @property
    def finished(self) -> bool:
        return self.progress.step >= self.total_steps

    def train_epoch(self, stop: StopSignal) -> dict:
        cfg, p, world = self.cfg, self.progress, self.world
        accum = cfg.trainer.accumulate_grad_batches
        self.train_loader.sampler.set_position(p.epoch, p.samples_in_epoch)
        if p.samples_in_epoch == 0:
            self._epoch_sums.zero_()
        sums = self._epoch_sums  # loss sum, correct, count on this rank (kept across a mid-epoch resume)
        done = p.samples_in_epoch // cfg.data.batch_size  # micro-batches already trained this epoch
        self.net.train()
        for x, y in self.train_loader:
            if done >= self.steps_per_epoch * accum or self.finished:
                break
            done += 1
            x, y = x.to(world.device, non_blocking=True), y.to(world.device, non_blocking=True)
            boundary = done % accum == 0
            # Micro-steps skip DDP's gradient all-reduce; the step's last micro-batch syncs them all.
            with (self.net.no_sync() if world.distributed and not boundary else contextlib.nullcontext()):
                with autocast(world.device, cfg.trainer.precision):
                    out = self.forward(x)
                    loss = self.loss_fn(out.float(), y)
                if cfg.debug.detect_anomaly and not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite loss {loss.item()} at epoch {p.epoch} step {p.step} batch {done - 1} "
                        f"(rank {world.rank}); debug=anomaly stopped here")
                self.scaler.scale(loss / accum).backward()
            sums[0] += loss.detach().double() * len(y)
            if self.task == "classification":
                sums[1] += (out.detach().argmax(1) == y).sum()
            sums[2] += len(y)
            if not boundary:
                continue
            self.optimizer_step()
            p.samples_in_epoch = done * cfg.data.batch_size
            if p.step % cfg.trainer.log_every_n_steps == 0:
                self.metrics.step({"epoch": p.epoch, "step": p.step, "loss": loss.item(),
                                   "lr": self.scheduler.get_last_lr()[0]})
            if w.any_rank(stop.received is not None, world.device):
                raise Preempted()
            every = cfg.checkpoint.every_n_steps
            if self.save_checkpoints and every and p.step % every == 0 and not self.finished:
                self.save(None)
        return {**reduce_metrics(sums, self.task), "complete": done >= self.steps_per_epoch * accum}

    def optimizer_step(self) -> None:
        if self.cfg.trainer.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.trainer.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.progress.step += 1

    def log_epoch(self, train: dict, val: dict, epoch_time: float) -> None:
        m = {"epoch": self.progress.epoch, "step": self.progress.step, "train_loss": train["loss"]}
        if "acc" in train:
            m["train_acc"] = train["acc"]
        m["val_loss"] = val["loss"]
        if "acc" in val:
            m["val_acc"] = val["acc"]
        m.update(lr=self.scheduler.get_last_lr()[0], samples_per_sec=train["samples"] / max(epoch_time, 1e-9),
                 epoch_time_s=epoch_time)
        self.last_metrics = m
        self.metrics.epoch(m)

    def finish(self, val: Optional[dict], wall: float, samples_per_sec: float) -> dict:
        cfg = self.cfg
        if val is None:  # resumed a run that had already finished
            val = evaluate(self.model, self.val_loader, self.loss_fn, self.task, self.world,
                           cfg.trainer.precision, cfg.debug.limit_batches)
        summary = {"config_name": cfg.name, "model": cfg.model.name, "data": cfg.data.name,
                   "epochs": self.progress.epoch, "steps": self.progress.step,
                   "train_loss": (self.last_metrics or {}).get("train_loss"), "val_loss": val["loss"],
                   "val_samples": val["samples"]}
        if "acc" in val:
            summary["val_acc"] = val["acc"]
        if self.test_loader is not None:
            test = evaluate(self.model, self.test_loader, self.loss_fn, self.task, self.world,
                            cfg.trainer.precision, cfg.debug.limit_batches)
            summary["test_loss"] = test["loss"]
            if "acc" in test:
                summary["test_acc"] = test["acc"]
        summary.update(wall_time_s=wall, samples_per_sec=samples_per_sec, world_size=self.world.world_size,
                       num_nodes=self.world.num_nodes, device=str(self.world.device),
                       precision=cfg.trainer.precision, run_dir=str(self.run_dir))
        log.info("summary: " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in summary.items()))
        if self.world.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def close(self) -> None:
        self.metrics.close()

    # -- checkpoints ------------------------------------------------------------------------------

    def state(self) -> dict:
        p = self.progress
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": p.epoch, "step": p.step, "samples_in_epoch": p.samples_in_epoch, "best": p.best,
                "world_size": self.world.world_size, "model_name": self.cfg.model.name,
                "config": as_dict(self.cfg), "metrics": self.last_metrics}

    def save(self, val: Optional[dict]) -> None:
        """Gather every rank's RNG and partial-epoch sums, let rank 0 write, and fail together."""
        p = self.progress
        per_rank = w.gather_objects({"rng": ckpt.rng_state(), "epoch_sums": self._epoch_sums.cpu()})
        is_best = False
        if val is not None:
            value = val["acc" if self.monitor == "val_acc" else "loss"]
            is_best = p.best is None or (value > p.best if self.monitor == "val_acc" else value < p.best)
            p.best = value if is_best else p.best
        error = None
        if self.world.is_main:
            try:
                path = ckpt.save(self.ckpt_dir, {**self.state(), "ranks": per_rank}, p.step,
                                 self.cfg.checkpoint.keep_last, is_best)
                log.info(f"checkpoint: {path}" + (" (best)" if is_best else ""))
            except ckpt.CheckpointError as e:
                error = str(e)
        error = w.broadcast_object(error)
        if error:
            raise ckpt.CheckpointError(error)

    def resume(self) -> None:
        cfg = self.cfg
        if cfg.resume == "none" or not self.save_checkpoints and cfg.resume == "auto":
            return
        if cfg.resume == "auto":  # rank 0 picks the newest good file so all ranks load the same one
            found = ckpt.find_resumable(self.ckpt_dir) if self.world.is_main else None
            path = w.broadcast_object(str(found[0]) if found else None)
            if path is None:
                return
        else:
            path = cfg.resume
        state = ckpt.load(Path(path), map_location=self.world.device)
        self.load_state(state, path)
        self.metrics.rewind(self.progress.step)  # epochs logged after this checkpoint will be re-run
        log.info(f"resumed from {path}: epoch {self.progress.epoch} step {self.progress.step}")

    def load_state(self, state: dict, path) -> None:
        if state["model_name"] != self.cfg.model.name:
            raise ckpt.CheckpointError(f"checkpoint {path} holds model={state['model_name']} but the config "
                                       f"asks for model={self.cfg.model.name}; pass the matching model= "
                                       "or resume=none to start fresh")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise ckpt.CheckpointError(f"checkpoint {path} does not fit this model/data "
                                       f"({str(e).splitlines()[0]}); resume=none starts fresh") from e
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress(state["epoch"], state["step"], state["samples_in_epoch"], state["best"])
        self.last_metrics = state["metrics"]
        ranks = state["ranks"]
        if state["world_size"] == self.world.world_size:
            ckpt.set_rng_state(ranks[self.world.rank]["rng"])
            self._epoch_sums.copy_(ranks[self.world.rank]["epoch_sums"])
        else:
            # The data position re-shards on any world size (see data.TrainSampler); per-rank random
            # streams cannot, so they restart from the seed and the partial-epoch sums go to rank 0.
            log.warning(f"resuming {state['world_size']} ranks' checkpoint on {self.world.world_size} "
                        "ranks: data continues from the saved position, random streams are re-seeded")
            seed_everything(self.cfg.seed + self.world.rank + state["step"])
            if self.world.is_main:
                self._epoch_sums.copy_(sum(r["epoch_sums"] for r in ranks))
