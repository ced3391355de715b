"""Callbacks: how users (and dtrain's own extras) hook into training, through one list called from one place.

A callback is a plain object with any of these methods, named as Lightning names them where it has one:

    on_fit_start(trainer)                  once, after a resume has restored the state, before training
    on_train_epoch_start(trainer)          before each epoch's first batch
    on_train_batch_end(trainer, outputs)   after every optimizer step: `outputs` holds the step's `loss` (a tensor
                                           on the device; reading it with .item() syncs the host, so do it rarely)
    on_log_step(trainer, metrics)          after an optimizer step, on log steps only (trainer.log_every_n_steps):
                                           `metrics` holds epoch, step, loss, lr; no host sync is added
    on_validation_end(trainer, metrics)    after each validation: val metrics, reduced over ranks
    on_train_epoch_end(trainer, metrics)   the epoch's record before it is logged (add entries to log them)
    on_fit_end(trainer, summary)           after training, before summary.json is written (add entries)
    on_exception(trainer, error)           when training ends by an exception, a stop signal included (after
                                           its checkpoint), before the exception goes on
    teardown(trainer)                      always, last: close what the callback opened

and, to have state saved in every checkpoint and restored on resume, `state_dict()` / `load_state_dict()` (only
tensors, numbers, strings, None and lists/dicts of them: checked when the run starts and before every save).
Hooks run on every rank, in list order. What a hook may use of `trainer`: `model` (the plain module),
`optimizer`, `progress` (epoch, step), `world`, `run` (the run folder), `cfg` (read-only) and `should_stop`:
setting it stops training after the current epoch on every rank (the ranks agree once per epoch). A callback
that writes files should write on the main rank only (`if trainer.world.is_main:`); one that runs the model
must run it on every rank (under dist.strategy=fsdp a forward is a collective). Early stopping, the
profiler, the plots and throughput/MFU reporting are callbacks of this kind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from dtrain import contracts
from dtrain.errors import ConfigError, ContractError
from dtrain.logs import log
from dtrain.tasks import Best, monitored

HOOKS = ("on_fit_start", "on_train_epoch_start", "on_train_batch_end", "on_log_step", "on_validation_end",
         "on_train_epoch_end", "on_fit_end", "on_exception", "teardown")


class Callback:
    """An optional base class: any object with some of the hooks is a callback."""


def check(name: str, callback: Any) -> None:
    """A method named like a hook that is not one (`on_epoch_end`) would never run: refuse it, naming it."""
    unknown = sorted(a for a in dir(type(callback)) if a.startswith("on_") and a not in HOOKS)
    if unknown:
        raise ConfigError(f"callbacks.{name}: {type(callback).__name__}.{unknown[0]} is not a dtrain hook; the hooks "
                          f"are {', '.join(HOOKS)}")
    if hasattr(callback, "state_dict") != hasattr(callback, "load_state_dict"):
        raise ConfigError(f"callbacks.{name}: {type(callback).__name__} has only one of state_dict and "
                          "load_state_dict; a callback with state needs both")


class Callbacks:
    """The run's callbacks by name, in order; `call` is the one place hooks are run from."""

    def __init__(self, named: dict[str, Any]):
        for name, callback in named.items():
            check(name, callback)
        self.named = dict(named)
        self._hooks = {hook: [(n, getattr(c, hook)) for n, c in self.named.items() if hasattr(c, hook)]
                       for hook in HOOKS}

    @classmethod
    def of(cls, users: dict[str, Any], own: dict[str, Any]) -> "Callbacks":
        """The user's callbacks, then dtrain's own; a user's named like one of dtrain's is refused (it would
        replace it, or be replaced)."""
        clash = sorted(users.keys() & own.keys())
        if clash:
            raise ConfigError(f"callbacks.{clash[0]}: the name is taken by dtrain's own {type(own[clash[0]]).__name__} "
                              f"callback; give yours another name (dtrain's own: {', '.join(own)})")
        return cls({**users, **own})

    def has(self, hook: str) -> bool:
        """Whether any callback has `hook` (the loop builds a hook's arguments only then)."""
        return bool(self._hooks[hook])

    def call(self, hook: str, *args: Any) -> None:
        for name, method in self._hooks[hook]:
            with torch.profiler.record_function(f"callbacks.{name}.{hook}"):  # traced in profiles
                method(*args)

    def state_dict(self) -> dict[str, Any]:
        """Every callback's state, for a checkpoint: refused, naming the callback and the value, where a
        checkpoint could not hold it (checked before anything is written)."""
        states = {n: c.state_dict() for n, c in self.named.items() if hasattr(c, "state_dict")}
        for name, state in states.items():
            found = contracts.unsaveable(state, "state_dict()")
            if found:
                raise ContractError(f"callbacks.{name}: {type(self.named[name]).__name__}.{found}, which a checkpoint "
                                    "cannot hold; keep tensors, numbers, strings, None and lists/dicts of them")
        return states

    def check_state(self) -> None:
        """Each callback's state round-trips through a checkpoint's save and load (when the run starts)."""
        for name, callback in self.named.items():
            if hasattr(callback, "state_dict"):
                contracts.check_callback_state(name, callback)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, callback in self.named.items():
            if hasattr(callback, "load_state_dict") and name in state:
                callback.load_state_dict(state[name])

    def __iter__(self) -> Iterable[Any]:
        return iter(self.named.values())


# -- dtrain's own callbacks ------------------------------------------------------------------------------

class EarlyStopping(Callback):
    """Stop once the monitored validation metric has gone `patience` validations in a row without beating
    its best by more than `min_delta` (patience 0: never)."""

    def __init__(self, monitor: str, patience: int, min_delta: float, higher_is_better: bool, epochs: int = 0,
                 optional: bool = False):
        self.monitor, self.patience, self.min_delta, self.epochs = monitor, patience, min_delta, epochs
        self.optional = optional  # a model's own validation may not report it: then there is nothing to follow
        self.tracked = Best(higher_is_better)
        self.bad = 0  # validations in a row without improvement

    @property
    def best(self) -> Optional[float]:
        return self.tracked.value

    @property
    def stopped(self) -> bool:
        return self.bad >= self.patience > 0

    def on_fit_start(self, trainer) -> None:
        if self.stopped:  # resumed a run that had stopped early: nothing more to train
            trainer.should_stop = True

    def on_validation_end(self, trainer, metrics: dict) -> None:
        if not self.patience:
            return
        value = monitored(metrics, self.monitor, self.optional and not self.patience)
        if value is None:
            return
        self.bad = 0 if self.tracked.offer(value, self.min_delta) else self.bad + 1
        if self.stopped:
            trainer.should_stop = True
            log.info(f"early stopping: {self.monitor} has not improved by more than {self.min_delta:g} for "
                     f"{self.bad} validations (best {self.tracked.value:.6g}); stopping after epoch "
                     f"{trainer.progress.epoch + 1} of {self.epochs}")

    def state_dict(self) -> dict:
        return {"best": self.tracked.value, "bad": self.bad}  # patience and min_delta are the running config's

    def load_state_dict(self, state: dict) -> None:
        self.tracked.value, self.bad = state.get("best"), state.get("bad", 0)


class Throughput(Callback):
    """FLOP/s from the model's FLOPs per sample (counted once, from one forward pass) and the loop's
    samples/s, and model FLOP utilisation where the GPU's peak is known."""

    def __init__(self, example: Optional[torch.Tensor], precision_is_low: bool,
                 whole: Optional[Callable[[], nn.Module]] = None):
        self.example, self.low = example, precision_is_low  # one input, zeros (perf.example_input)
        # Under tensor parallelism the trained model's split layers hand on slices that a counter would count
        # as whole inputs (attention with 1/tp of its heads): `whole` builds the unsplit model on the meta
        # device to count on instead.
        self.whole = whole
        self.flops_per_sample: Optional[int] = None
        self.peak: Optional[float] = None

    def on_fit_start(self, trainer) -> None:
        from dtrain import perf
        if self.whole is not None:
            self.flops_per_sample = perf.training_flops_per_sample(self.whole(), self.example, torch.device("meta"))
        else:
            self.flops_per_sample = perf.training_flops_per_sample(trainer.model, self.example, trainer.world.device)
        self.peak = perf.peak_flops(trainer.world.device, self.low)

    def add(self, metrics: dict, world_size: int) -> None:
        if self.flops_per_sample and metrics.get("samples_per_sec") is not None:
            metrics["flops_per_sec"] = flops = self.flops_per_sample * metrics["samples_per_sec"]
            if self.peak:
                metrics["mfu"] = flops / (self.peak * world_size)

    def on_train_epoch_end(self, trainer, metrics: dict) -> None:
        self.add(metrics, trainer.world.world_size)

    def on_fit_end(self, trainer, summary: dict) -> None:
        self.add(summary, trainer.world.world_size)


class Memory(Callback):
    """What one rank holds, in summary.json and the report: `state_bytes_per_rank` (its parameters,
    gradients and optimizer state: the largest rank's, so a sharded model shows its shard), the largest
    process's peak resident memory (`peak_rss_bytes`) and, on CUDA, `peak_memory_bytes` (its peak allocation)."""

    def on_fit_end(self, trainer, summary: dict) -> None:
        from dtrain import perf
        from dtrain import world as w
        held = perf.state_bytes(trainer.model, trainer.optimizer)
        cuda = trainer.world.device.type == "cuda"
        peaks = [perf.peak_rss_bytes(),
                 torch.cuda.max_memory_allocated(trainer.world.device) if cuda else 0]
        largest = w.max_each_over_ranks([*held.values(), *peaks], trainer.world.device)  # one collective
        summary["state_bytes_per_rank"] = dict(zip(held, largest))
        summary["peak_rss_bytes"] = largest[len(held)]
        if cuda:
            summary["peak_memory_bytes"] = largest[-1]


class Profiler(Callback):
    """torch.profiler trace of this rank from the start of training to the first log step at least 3
    steps in (a lower trainer.log_every_n_steps gives a shorter trace), in folder/rank{N}.*.pt.trace.json,
    which Perfetto (ui.perfetto.dev) and TensorBoard's profiler plugin open."""

    def __init__(self, folder: Path):
        self.folder, self.profile, self.first = folder, None, 0

    def on_train_epoch_start(self, trainer) -> None:
        if self.profile is None and self.first == 0:
            from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler
            cuda = trainer.world.device.type == "cuda"
            self.profile = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
                                   on_trace_ready=tensorboard_trace_handler(
                                       str(self.folder), worker_name=f"rank{trainer.world.rank}"),
                                   record_shapes=True)
            self.first = trainer.progress.step + 1
            self.profile.start()

    def on_log_step(self, trainer, metrics: dict) -> None:
        if self.profile is not None and trainer.progress.step >= self.first + 2:
            self.stop()

    def on_fit_end(self, trainer, summary: dict) -> None:
        self.stop()

    def stop(self) -> None:
        if self.profile is not None:
            self.profile.stop()  # writes the trace
            self.profile = None


class Plots(Callback):
    """At the end, on the main rank: confusion.json and samples.npz (what a plot needs beyond
    metrics.jsonl), then every plot dtrain.plots can draw from the run folder. Given what it needs of the data
    when built: the validation set and its class names, and whether a confusion matrix and a grid of
    predicted images make sense (a classifier; of images)."""

    def __init__(self, val: Any, classes: list[str], classifies: bool, images: bool):
        self.val, self.classes, self.classifies, self.images = val, classes, classifies, images
        self.confusion: Optional[list] = None

    def on_validation_end(self, trainer, metrics: dict) -> None:
        self.confusion = metrics.get("confusion")

    def on_fit_end(self, trainer, summary: dict) -> None:
        from dtrain import plots
        from dtrain.tasks import predict_samples
        run, classify = trainer.run, self.classifies and self.confusion is not None
        # Every rank predicts (a sharded model's forward is a collective); the main rank writes.
        samples = predict_samples(trainer.model, self.val, trainer.world.device) if classify and self.images else None
        if not trainer.world.is_main:
            return
        if classify:
            run.write_text(run.confusion, json.dumps({"classes": self.classes, "matrix": self.confusion}) + "\n")
            if samples is not None:  # images: a grid of predictions to look at
                run.write(run.samples, lambda: plots.save_samples(run.samples, **samples, classes=self.classes))
        for name in plots.PLOTS:
            run.write(run.path / name, lambda name=name: plots.draw_one(run.path, name))
