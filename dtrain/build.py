"""The composition root: a validated config (and, from `dtrain.fit`, the user's own objects) becomes the
parts of a run. Nothing here trains; `Trainer` (dtrain/trainer.py) only runs the loop over these parts.

    data -> task -> model -> strategy (wrap) -> optimizer, scheduler, scaler -> loss, metrics
    -> callbacks (the user's, then dtrain's own) -> metric sinks -> checkpointer

Each of model, data, loss, metrics and callbacks comes from its `_target_` in the config, or, when
`dtrain.fit` passes them as `Objects`, from the object itself.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from dtrain import callbacks as cb
from dtrain import data, models, objective, optim, perf, plugins, strategy, tasks
from dtrain import world as w
from dtrain.checkpoint import seed_everything
from dtrain.checkpointer import Checkpointer
from dtrain.config import Config, Precision, as_dict, flat
from dtrain.errors import ConfigError
from dtrain.logs import log
from dtrain.validate import fail
from dtrain.sinks import Context, MetricLogger
from dtrain.rundir import RunDir
from dtrain.steps import has_own_step
from dtrain.strategy import tensor
from dtrain.tasks import Task


@dataclass
class Objects:
    """What `dtrain.fit` was given instead of `_target_`s (None: the config's)."""
    model: Any = None  # an nn.Module, or a callable returning one (given input_shape, num_outputs, ...)
    data: Any = None  # a Dataset, a dict of splits, or a callable returning either
    loss: Any = None  # an nn.Module loss, or a function (output, target) -> scalar
    metrics: Optional[dict] = None  # name -> a torchmetrics Metric, or a function (output, target) -> value
    callbacks: tuple = ()
    collate: Any = None  # a function: a list of items -> a batch

    def held_only(self) -> list[str]:
        """What a checkpoint cannot rebuild from its config (evaluate asks for these): a model whose class an
        import does not find (a script's own), a data set given as an object (not a class or function an import
        finds), a loss, collate or metric not such a function. A model instance of an importable class is
        rebuilt from its class, and strict loading refuses one whose shapes differ."""
        model = self.model if self.model is None or inspect.isclass(self.model) or inspect.isfunction(self.model) \
            else type(self.model)
        held = [] if model is None or plugins.importable(model) else ["model"]
        held += [] if self.data is None or plugins.importable(self.data) else ["data"]
        for key, obj in (("loss", self.loss), ("collate", self.collate), *(
                (f"metrics.{name}", m) for name, m in (self.metrics or {}).items())):
            if obj is not None and not (inspect.isfunction(obj) and plugins.importable(obj)):
                held.append(key)
        return held


@dataclass
class Parts:
    """Everything a run is made of, built once."""
    cfg: Config
    world: w.World
    run: RunDir
    splits: data.Splits
    task: Task
    loaders: data.Loaders
    model: nn.Module  # the plain module, on the device: what is saved and evaluated
    strategy: strategy.Strategy
    net: nn.Module  # what the forward pass runs on: the model wrapped for the world (and compiled)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    metrics: dict  # name -> extra validation metric
    callbacks: cb.Callbacks
    logger: MetricLogger
    checkpointer: Checkpointer
    steps_per_epoch: float  # inf for a stream
    total_steps: float  # inf for a stream without trainer.max_steps
    input_format: torch.memory_format = torch.preserve_format
    custom_loss: bool = False  # the loss is the user's (named in its errors), not the task's


def parts(cfg: Config, world: w.World, run: RunDir, objects: Optional[Objects] = None) -> Parts:
    tc, given = cfg.trainer, objects or Objects()
    plan = strategy.build(cfg, world)
    seed_everything(cfg.seed)  # same initial weights on every rank (DDP broadcasts rank 0's anyway)
    splits = data.build(cfg.data, world, plugins.called(given.data, {"options": cfg.data, "world": world}))
    agree_across_ranks(cfg, world, splits)
    task = tasks.get(splits.task)
    input_format = perf.memory_format(tc.channels_last, splits.shape)
    model, net = plan.setup(lambda: make_model(cfg, splits, given), input_format)
    if cfg.dist.loss_parallel and (given.loss is not None or has_own_step(model)):
        fail("dist.loss_parallel", True, "it computes the task's own cross-entropy on logits split over the "
             "vocabulary; not with a loss of your own or a model's own training_step")
    perf.set_tf32(tc.tf32)
    if tc.compile:
        net = torch.compile(net)
    seed_everything(cfg.seed + plan.dp.rank)  # data-parallel ranks draw different augmentation/dropout noise
    loaders = data.loaders(splits, cfg, plan.data_world, data.collate_of(cfg.data, given.collate))
    stream = data.is_stream(splits.train)  # one pass of it is an epoch, of a length not known in advance
    steps_per_epoch, total_steps = schedule_length(cfg, None if stream else len(loaders.train),
                                                   endless=stream and not data.streams.has_length(splits.train))
    optimizer = optim.build_optimizer(model, cfg.optim, world.device.type,
                                      sharded=plan.shards_parameters, sparse=optim.makes_sparse_gradients(model))
    metrics = objective.make_metrics(cfg, given.metrics, world.device)
    own = has_own_step(model)  # its validation_step says what it reports, once it has run
    optional = (own or splits.val is None) and cfg.checkpoint.monitor == "auto"  # val_loss, where reported
    if splits.val is None and cfg.checkpoint.monitor != "auto":
        fail("checkpoint.monitor", cfg.checkpoint.monitor, f"data={cfg.data.name} is a stream without a 'val' split, "
             "so nothing is validated; give the factory's dict a 'val' or leave checkpoint.monitor=auto")
    if splits.val is None:
        log.info(f"data={cfg.data.name} is a stream without a 'val' split (a stream cannot be carved into one): "
                 "validation is skipped; give the data factory's dict a 'val' to validate")
    monitor = tasks.monitor(cfg.checkpoint.monitor, tasks.Task() if own else task,
                            None if own else tuple(f"val_{m}" for m in (*task.eval_metrics, *metrics)))
    higher = tasks.higher_is_better(monitor, cfg.checkpoint.mode.value)
    callbacks = cb.Callbacks.of(user_callbacks(cfg, given.callbacks),
                                own_callbacks(cfg, run, splits, task, monitor, higher, optional, given))
    samples_per_step = cfg.data.batch_size * tc.accumulate_grad_batches
    return Parts(
        cfg=cfg, world=world, run=run, splits=splits, task=task, loaders=loaders, model=model, strategy=plan,
        net=net, optimizer=optimizer,
        scheduler=optim.build_scheduler(optimizer, cfg.sched, cfg.optim.lr, total_steps, steps_per_epoch),
        scaler=plan.grad_scaler(),
        loss=objective.make_loss(cfg, task, given.loss),
        metrics=metrics,
        callbacks=callbacks,
        logger=MetricLogger(world, run, cfg.logger, Context(cfg.name, as_dict(cfg), tc.epochs, total_steps,
                                                            samples_per_step)),
        checkpointer=Checkpointer(run.checkpoints, cfg.checkpoint, world,
                                  enabled=not cfg.debug.limit_batches and not cfg.debug.overfit_batches,
                                  monitor=monitor, higher_is_better=higher, fmt=strategy.checkpoint_format(cfg),
                                  optional_monitor=optional,
                                  meta={"model_name": cfg.model.name, "config": as_dict(cfg),
                                        "data": splits.describe(), "world_size": world.world_size,
                                        "objects": given.held_only()},
                                  record_change=lambda line: run.write_text(run.config_changes, line, True)),
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, input_format=input_format,
        custom_loss=given.loss is not None or cfg.loss is not None)


def agree_across_ranks(cfg: Config, world: w.World, splits: data.Splits) -> None:
    """Every rank trains the same config on data of the same size, or the replicas drift apart (other
    overrides per rank) or a collective mismatches (another number of steps): refused before the first
    collective of training, naming the first difference."""
    sizes = {f"the {name} split's size": len(ds) if data.streams.has_length(ds) else None
             for name, ds in (("train", splits.train), ("val", splits.val), ("test", splits.test)) if ds is not None}
    differs = w.first_disagreement({**flat(as_dict(cfg)), **sizes}) if world.distributed else None
    if differs:
        raise ConfigError(f"the ranks disagree on what to train: {differs}; give every rank the same overrides and "
                          "the same data")


def make_model(cfg: Config, splits: data.Splits, given: Objects) -> nn.Module:
    """The model the config names (or dtrain.fit's), for data of this shape (the strategy builds it where it
    must: on the meta device for a sharded init)."""
    if given.model is not None:
        return models.from_object(given.model, splits.task, splits.shape, splits.out)
    return models.build(cfg.model, splits.task, splits.shape, splits.out, cfg.data.name)


def meta_model(cfg: Config, splits: data.Splits, given: Objects) -> nn.Module:
    """The model built on the meta device: its shapes without memory or a random draw."""
    with torch.device("meta"):
        return make_model(cfg, splits, given)


def check_tensor_plan(cfg: Config, world: w.World) -> None:
    """What the tensor-parallel plan would refuse on every worker (a glob that matches nothing, a width or
    head count that does not divide by dist.tp), refused once before any starts: the data set is opened for
    its shapes (never downloaded: `download` off) and the model built on the meta device (no memory, no
    initialisation). Best effort: where either cannot be done here, the workers check at start-up."""
    import copy
    options = copy.deepcopy(cfg.data)
    if "download" in options.kwargs:
        options.kwargs["download"] = False
    try:
        model = meta_model(cfg, data.build(options, dataclasses.replace(world, device=torch.device("cpu"))), Objects())
    except Exception as e:  # noqa: BLE001 (a data set not yet downloaded, a model that needs real tensors)
        log.debug(f"dtrain-launch: the tensor-parallel plan is checked by the workers ({type(e).__name__}: {e})")
        return
    tensor.plan_of(model, cfg.dist.tp_plan, cfg.dist.tp, cfg.dist.sequence_parallel, cfg.dist.loss_parallel)


def schedule_length(cfg: Config, batches_per_epoch: Optional[int], endless: bool = False) -> tuple[float, float]:
    """Optimizer steps per epoch and in all (debug.limit_batches and trainer.max_steps shorten them). A stream's
    epoch (one pass) has no length known in advance (inf): trainer.max_steps, or its end, ends the run."""
    tc = cfg.trainer
    if batches_per_epoch is None:
        if tc.max_steps > 0:
            return math.inf, tc.max_steps
        if endless:
            raise ConfigError("data: the stream has no end that dtrain can know (no __len__): set trainer.max_steps "
                              "to say how many optimizer steps to train")
        if cfg.sched.name not in ("none",):
            fail("sched", cfg.sched.name, "its decay needs the run's length in steps; with a stream, set "
                 "trainer.max_steps (or sched=none)")
        return math.inf, math.inf
    batches = min(cfg.debug.limit_batches or batches_per_epoch, batches_per_epoch)
    per_epoch = batches // tc.accumulate_grad_batches
    if per_epoch < 1:
        raise ConfigError(f"trainer.accumulate_grad_batches={tc.accumulate_grad_batches} exceeds the "
                          f"{batches} batches of an epoch; lower it or data.batch_size")
    total = per_epoch * tc.epochs
    return per_epoch, min(total, tc.max_steps) if tc.max_steps > 0 else total


def user_callbacks(cfg: Config, given: tuple) -> dict[str, Any]:
    """The config's callbacks by name (built from their `_target_`s), then dtrain.fit's, named by class."""
    made = {name: plugins.instantiate(f"callbacks.{name}", target) for name, target in cfg.callbacks.items()}
    for i, callback in enumerate(given):
        name = type(callback).__name__
        made[name if name not in made else f"{name}_{i}"] = callback
    return made


def own_callbacks(cfg: Config, run: RunDir, splits: data.Splits, task: Task, monitor: str,
                  higher: bool, optional: bool = False, given: Optional[Objects] = None) -> dict[str, Any]:
    """dtrain's own callbacks, after the user's: early stopping, throughput/MFU, the profiler, the plots."""
    es = cfg.trainer.early_stopping
    whole = None
    if cfg.dist.tp > 1:  # FLOPs counted on the unsplit model, built on the meta device (no memory, no random draw)
        whole = lambda: meta_model(cfg, splits, given or Objects())  # noqa: E731
    own: dict[str, Any] = {
        "early_stopping": cb.EarlyStopping(monitor, es.patience, es.min_delta, higher, cfg.trainer.epochs, optional),
        "throughput": cb.Throughput(perf.example_input(splits.shape, splits.input_dtype),
                                    cfg.trainer.precision != Precision.fp32, whole), "memory": cb.Memory()}
    if cfg.trainer.profile:
        own["profiler"] = cb.Profiler(run.track(run.path / "profile"))
    if cfg.logger.plots:
        own["plots"] = cb.Plots(splits.val, splits.names(), task.classifies, len(splits.shape) == 3)
    return own
