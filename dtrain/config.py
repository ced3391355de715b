"""Typed config schemas (Hydra structured configs) and the one validation pass.

Hydra checks types and unknown keys while composing; `to_config` refuses keys added with `+` that the
schema does not know, and `validate` checks values once at start-up, naming the key, the bad value and
what is allowed. Past this module the code receives a plain `Config` object, never a DictConfig.
The registries' names (models, data sets, ...) are passed in, so this module imports none of them.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dtrain import plugins, rundir
from dtrain import world as world_env
from dtrain.errors import ConfigError


class Precision(str, enum.Enum):
    fp32 = "fp32"
    bf16 = "bf16"  # autocast to bfloat16, no grad scaler
    fp16 = "fp16"  # autocast to float16 with a grad scaler (CUDA, and CPU where this PyTorch can)


class Backend(str, enum.Enum):
    auto = "auto"  # nccl on CUDA, gloo on CPU
    nccl = "nccl"
    gloo = "gloo"


class DataPath(str, enum.Enum):
    auto = "auto"  # device for data sets held in memory (mnist*, cifar10, synthetic, regression), else stream
    device = "device"  # the whole data set on the device, batches are index slices (data.DeviceLoader)
    stream = "stream"  # a DataLoader with workers (data.StreamLoader)


class WandbMode(str, enum.Enum):
    online = "online"  # falls back to offline, with a warning, when the service cannot be reached
    offline = "offline"  # written under <run>/wandb/; `wandb sync` uploads it later
    disabled = "disabled"


class Monitor(str, enum.Enum):
    auto = "auto"  # the task's own: val_acc for classification, val_loss for regression
    val_acc = "val_acc"
    val_loss = "val_loss"
    val_f1 = "val_f1"  # classification: macro F1
    val_auc = "val_auc"  # classification: macro one-vs-rest AUC-ROC


class TaskName(str, enum.Enum):  # what a CSV file's target column is (data=csv)
    regression = "regression"
    classification = "classification"


@dataclass
class ModelConfig:
    """`model`: `_target_` (any callable returning an nn.Module) and its keyword arguments, beside dtrain's
    own keys below; dtrain's keys are never passed to the callable, every other key is (`kwargs`)."""
    name: str = ""  # what the run is named after; "": the last part of _target_
    sync_batchnorm: bool = False  # convert BatchNorm to SyncBatchNorm under DDP
    init_from: Optional[str] = None  # a saved state_dict (or dtrain checkpoint) to start from, not random weights
    factory: Optional[str] = None  # `_target_` in the config
    kwargs: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    """`data`: `_target_` (a callable returning a map-style Dataset or a dict of splits, or dtrain's Splits)
    and its keyword arguments, beside dtrain's own loader keys below, which are never passed to it."""
    name: str = ""  # what the run is named after; "": the last part of _target_
    batch_size: int = 128  # GLOBAL batch per micro-step, split evenly across ranks
    eval_batch_size: int = 1000  # global batch for validation/test
    val_fraction: float = 0.1  # share of the training split held out for validation
    split_seed: int = 0  # fixes the train/val split independently of the training seed
    loader: DataPath = DataPath.auto
    num_workers: int = 0  # stream path: DataLoader worker processes
    pin_memory: Optional[bool] = None  # stream path; None: on CUDA
    persistent_workers: bool = True  # stream path, with workers
    prefetch_factor: int = 2  # stream path, with workers: batches each worker loads ahead
    drop_last: bool = True  # False: pad the sampler and keep the short last batch
    # Training images only, in order (dtrain/augment.py): crop, flip, rotate, scale, jitter, or the presets
    # cifar (crop, flip) and tutorial (rotate, scale, crop, flip); their parameters below.
    augment: list[str] = field(default_factory=list)
    crop_padding: int = 4  # crop: a random crop of the zero-padded image, back to its size
    rotate_degrees: float = 10.0  # rotate: a random angle in [-d, d]
    scale_range: list[float] = field(default_factory=lambda: [0.9, 1.1])  # scale: a random zoom in [lo, hi]
    jitter: float = 0.2  # jitter: brightness, contrast (colour: saturation) by a factor in [1-j, 1+j]
    normalize: bool = True  # images: per channel; csv: per feature, with the training split's statistics
    mean: Optional[list[float]] = None  # per channel (csv: per feature); None: the training split's own statistics
    std: Optional[list[float]] = None
    # regression or classification: data=csv needs it; for your own data set it overrides what the targets'
    # dtype says (integers: classification)
    task: Optional[TaskName] = None
    factory: Optional[str] = None  # `_target_` in the config
    kwargs: dict = field(default_factory=dict)


@dataclass
class OptimConfig:
    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd, rmsprop
    nesterov: bool = False  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam, adamw
    eps: float = 1e-8
    alpha: float = 0.99  # rmsprop
    lr_decay: float = 0.0  # adagrad
    l1: float = 0.0  # L1 penalty: l1 * sum(|w|) over all parameters added to the loss (reported as l1_penalty)


@dataclass
class SchedConfig:
    name: str = "none"
    warmup_steps: int = 0  # linear warm-up from warmup_start_factor*lr, in optimizer steps
    warmup_start_factor: float = 0.1
    step_size: int = 1  # step: decay every step_size epochs
    gamma: float = 0.1  # step: decay factor
    min_lr: float = 0.0  # cosine: floor
    pct_start: float = 0.3  # onecycle: share of the run spent rising to optim.lr


@dataclass
class EarlyStoppingConfig:
    patience: int = 0  # stop after this many validations without improvement of checkpoint.monitor; 0 = off
    min_delta: float = 0.0  # an improvement must beat the best value by more than this


@dataclass
class TrainerConfig:
    epochs: int = 5
    max_steps: int = -1  # optimizer steps; > 0 stops early
    precision: Precision = Precision.fp32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    accumulate_grad_batches: int = 1
    label_smoothing: float = 0.0
    log_every_n_steps: int = 50
    compile: bool = False  # torch.compile the model (needs a C++ compiler on CPU, Triton on GPU)
    tf32: bool = True  # CUDA: TF32 tensor cores for fp32 matmuls and convolutions
    channels_last: bool = False  # images and convolution weights in NHWC memory format (faster on tensor cores)
    sync_every_n_steps: int = 10  # DDP: ranks agree on a stop signal every N optimizer steps (one tiny all-reduce)
    profile: bool = False  # torch.profiler trace of a few early steps, per rank, in <run>/profile/
    stop_grace_s: float = 20.0  # after SIGTERM/SIGUSR1, exit anyway if no clean stop came by then
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


@dataclass
class DistConfig:
    backend: Backend = Backend.auto
    timeout_s: float = 300.0  # collectives and forming the world
    # DistributedDataParallel's options, with PyTorch's defaults
    bucket_cap_mb: float = 25.0
    gradient_as_bucket_view: bool = False
    static_graph: bool = False
    find_unused_parameters: bool = False  # needed by models with parameters some steps do not use
    broadcast_buffers: bool = True


@dataclass
class CheckpointConfig:
    enabled: bool = True
    every_n_epochs: int = 1  # 0 = only at the end
    every_n_steps: int = 0  # 0 = off
    keep_last: int = 2
    monitor: Monitor = Monitor.auto  # the metric best.pt is chosen by
    allow_config_change: bool = False  # resume although training values changed (noted in config-changes.jsonl)


@dataclass
class LoggerConfig:  # sinks are flags, several at once; conf/logger/ has presets (wandb, tensorboard, all)
    name: str = "default"
    console: bool = True
    jsonl: bool = True
    tensorboard: bool = False  # <run>/tensorboard/: scalars per step and epoch, hparams with the final metrics
    wandb: bool = False  # main process only, one run per job; resumed jobs continue the same wandb run
    wandb_project: str = "dtrain"
    wandb_entity: Optional[str] = None
    wandb_mode: WandbMode = WandbMode.online  # WANDB_MODE in the environment wins, as in wandb itself
    wandb_init_timeout_s: float = 60.0
    plots: bool = True  # PNG curves, confusion matrix and a prediction grid in the run folder at the end
    progress_bar: Optional[bool] = None  # None: a bar when stdout is a terminal, else periodic log lines


@dataclass
class DebugConfig:
    name: str = "none"
    limit_batches: int = 0  # > 0: at most this many train/val/test batches per epoch (debug=fast)
    overfit_batches: int = 0  # > 0: train and validate on these first fixed batches (debug=overfit)
    detect_anomaly: bool = False  # autograd anomaly mode + stop at the first non-finite loss


@dataclass
class LauncherConfig:  # read by dtrain.launch only (see its docstring); 0 and "" mean "from the machine/SLURM"
    nproc_per_node: int = 0  # 0: one per GPU on this node, else 1
    nnodes: int = 0  # 0: SLURM_NNODES inside an allocation, else 1
    rdzv_endpoint: str = ""  # host:port; "": the first SLURM node (port from the job id), else localhost
    rdzv_id: str = ""  # "": the SLURM job id, else a fresh id
    max_restarts: int = 0
    monitor_interval: float = 1.0


def own_defaults(schema: type) -> dict:
    """dtrain's keys of `model` or `data` with their defaults: always in the composed config, so each can
    be overridden on the command line beside whatever keys the chosen group file adds."""
    out = {}
    for f in dataclasses.fields(schema):
        if f.name in ("factory", "kwargs"):
            continue
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out[f.name] = value.value if isinstance(value, enum.Enum) else value
    return out


@dataclass
class Config:
    # model and data mix dtrain's keys with the keyword arguments of their `_target_`: composed as plain
    # dicts, typed as ModelConfig and DataConfig by `to_config`. loss, metrics and callbacks are `_target_`s
    # too (plugins.Target once typed): metrics and callbacks by name, so one can be overridden or removed.
    model: Any = field(default_factory=lambda: own_defaults(ModelConfig))
    data: Any = field(default_factory=lambda: own_defaults(DataConfig))
    loss: Any = None  # {_target_: an nn.Module loss, or a function (output, target) -> scalar}; None: the task's
    metrics: Any = field(default_factory=dict)  # name -> {_target_: ...}: extra validation metrics
    callbacks: Any = field(default_factory=dict)  # name -> {_target_: ...}: see dtrain/callbacks.py
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    name: str = "${dtrain_run_name:}"  # <model name>-<data name>
    seed: int = 0
    resume: str = "auto"  # auto | last (the newest run of this config) | none | PATH to a checkpoint file


def register() -> None:
    ConfigStore.instance().store(name="dtrain_schema", node=Config)
    # Every rank must agree on one run folder, yet Hydra resolves it per process before any
    # communication exists; the run id therefore comes from what the launcher shares (see world.py).
    if not OmegaConf.has_resolver("dtrain_run_id"):
        OmegaConf.register_new_resolver("dtrain_run_id", rundir.folder_id)
        OmegaConf.register_new_resolver("dtrain_sweep_id", rundir.sweep_id)
        OmegaConf.register_new_resolver("dtrain_choices", choices_help)
        OmegaConf.register_new_resolver("dtrain_run_name", run_name)


def part_name(node: Any) -> str:
    """A model's or data set's name: its `name`, else the last part of its `_target_`."""
    if not isinstance(node, Mapping):
        return "?"
    return str(node.get("name") or plugins.short_name(str(node.get("_target_") or "?")))


def run_name(*, _root_: DictConfig) -> str:
    return f"{part_name(_root_.get('model'))}-{part_name(_root_.get('data'))}"


def choices_help() -> str:
    """`--help`'s list of the keys whose values are a fixed set (the schema's enums)."""
    lines = []

    def walk(schema: type, prefix: str) -> None:
        for f in dataclasses.fields(schema):
            kind = f.type if isinstance(f.type, type) else globals().get(str(f.type).removeprefix(
                "Optional[").removesuffix("]"))
            if isinstance(kind, type) and issubclass(kind, enum.Enum):
                lines.append(f"  {prefix}{f.name}: {', '.join(kind.__members__)}")
            elif dataclasses.is_dataclass(kind):
                walk(kind, f"{prefix}{f.name}.")

    walk(Config, "")
    return "\n".join(lines)


def to_object(cfg: DictConfig) -> Any:
    """OmegaConf.to_object, with a missing or ill-typed value reported as a one-line ConfigError."""
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{key}: {msg}" if key else msg) from e


def refuse_unknown_keys(cfg: DictConfig, schema: type, prefix: str = "") -> None:
    """A key added with `+` (`+trainer.epoch=3`) that the schema lacks would be dropped silently by
    `to_object`; refuse it like Hydra refuses an unknown key without `+`."""
    known = {f.name: f for f in dataclasses.fields(schema)}
    for key in cfg.keys():
        name = f"{prefix}{key}"
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {prefix}{close[0]}? " if close else ""
            raise ConfigError(f"{name}: no such key ({hint}`python -m dtrain --cfg job` prints every key)")
        node = cfg._get_node(key)
        kind = known[key].type if isinstance(known[key].type, type) else globals().get(str(known[key].type))
        if isinstance(node, DictConfig) and dataclasses.is_dataclass(kind):
            refuse_unknown_keys(node, kind, f"{name}.")


def to_config(cfg: DictConfig, choices: Mapping[str, Sequence[str]],
              builtins: Mapping[str, Mapping[str, str]] = {}, given: frozenset[str] = frozenset()) -> Config:
    """The composed DictConfig as a typed, resolved, validated `Config`. `choices` maps the groups with
    registries (optim, sched, data.augment) to the names they know; `builtins` maps "model" and "data" to
    dtrain's own names and their `_target_`s, for configs saved before `_target_` existed. `given`: the
    parts dtrain.fit passes as objects, whose `_target_` records their class but is not built from."""
    refuse_unknown_keys(cfg, Config)
    obj = to_object(cfg)
    assert isinstance(obj, Config)
    obj.model = typed_part("model", ModelConfig, obj.model, builtins.get("model", {}))
    obj.data = typed_part("data", DataConfig, obj.data, builtins.get("data", {}))
    obj.loss = plugins.from_node("loss", obj.loss) if obj.loss is not None else None
    obj.metrics, obj.callbacks = named_targets("metrics", obj.metrics), named_targets("callbacks", obj.callbacks)
    validate(obj, choices, given)
    return obj


def typed_part(key: str, schema: type, node: Any, legacy: Mapping[str, str]) -> Any:
    """`model` or `data` as its schema: dtrain's own keys typed and checked, `_target_` as `factory`, every
    other key in `kwargs` for the factory."""
    if not isinstance(node, Mapping):
        raise ConfigError(f"{key}: expected a config group (a mapping with _target_), found {node!r}")
    rest = dict(node)
    factory = rest.pop("_target_", None)
    own = {f.name for f in dataclasses.fields(schema)} - {"factory", "kwargs"}
    mine = {k: rest.pop(k) for k in list(rest) if k in own}
    try:
        typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), mine))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{key}.{getattr(e, 'full_key', '') or ''}: {str(e).splitlines()[0]}") from None
    if factory is None and typed.name in legacy:  # saved before _target_: dtrain's own, by name, with every
        factory = legacy[typed.name]  # key of the old flat schema; keep those the factory takes
        params = plugins.accepted(plugins.resolve(key, factory), rest)
        rest = {k: v for k, v in rest.items() if k in params}
    typed.factory, typed.kwargs = factory, rest
    typed.name = typed.name or (plugins.short_name(factory) if factory else "")
    return typed


def named_targets(key: str, node: Any) -> dict[str, plugins.Target]:
    """metrics/callbacks: name -> {_target_: ...} (a null entry is removed); a list is named by its targets."""
    if node is None:
        return {}
    if isinstance(node, list):
        node = {plugins.short_name(str(e.get("_target_", "?"))).lower() if isinstance(e, Mapping) else str(i): e
                for i, e in enumerate(node)}
    if not isinstance(node, Mapping):
        raise ConfigError(f"{key}: expected named entries ({key}.NAME: {{_target_: ...}}), found {node!r}")
    return {str(n): plugins.from_node(f"{key}.{n}", v) for n, v in node.items() if v is not None}


def fail(key: str, value: Any, allowed: str) -> None:
    """One ConfigError naming the key, its value and what is allowed."""
    raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _one_of(key: str, value: Any, choices) -> None:
    if value not in choices:
        fail(key, value, "choose one of " + ", ".join(map(str, choices)))


def _positive(key: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        fail(key, value, "must be > 0")


def _non_negative(key: str, value: float) -> None:
    if not (value >= 0 and math.isfinite(value)):
        fail(key, value, "must be >= 0")


MODEL_OFFERS = ("input_shape", "num_outputs", "num_classes")  # what dtrain passes a model factory that takes it
DATA_OFFERS = ("options", "world")  # what dtrain passes a data factory that takes it


def check_targets(cfg: Config, given: frozenset[str] = frozenset()) -> None:
    """Every `_target_` resolves and takes the keyword arguments its config gives: imports modules, builds
    nothing (so the launcher can run it before any worker starts). Parts in `given` come as objects."""
    for key, part in (("model", cfg.model), ("data", cfg.data)):
        if not part.factory and key not in given:
            raise ConfigError(f"{key}: no _target_; choose {key}=NAME, a file {key}/NAME.yaml with "
                              "_target_: package.module.Name and its keyword arguments")
    if "model" not in given:
        factory = plugins.check("model", cfg.model.factory, cfg.model.kwargs, MODEL_OFFERS)
        if hasattr(factory, "dtrain_check"):  # dtrain's own models check their options here
            factory.dtrain_check(cfg.model)
    if "data" not in given:
        builder = plugins.check("data", cfg.data.factory, cfg.data.kwargs, DATA_OFFERS)
        if cfg.data.task is not None and getattr(builder, "dtrain_task", None):
            fail("data.task", cfg.data.task.value, f"data={cfg.data.name} decides its own task; data.task is "
                 "for data=csv and your own data sets")
        if hasattr(builder, "dtrain_check"):  # dtrain's own data sets check their arguments here
            builder.dtrain_check(cfg.data)
    if cfg.loss is not None and "loss" not in given:
        plugins.check_callable("loss", cfg.loss, positional=2)
    for name, target in cfg.metrics.items():
        plugins.check_callable(f"metrics.{name}", target, positional=2)
    for name, target in cfg.callbacks.items():
        plugins.check(f"callbacks.{name}", target.path, target.kwargs)


def validate(cfg: Config, choices: Mapping[str, Sequence[str]], given: frozenset[str] = frozenset()) -> None:
    """Check every value once, before anything is built. Raises ConfigError naming the key."""
    for key, names in choices.items():  # "model": model.name; "data.augment": each name in the list
        section, _, attr = key.partition(".")
        value = getattr(getattr(cfg, section), attr or "name")
        for one in value if isinstance(value, list) else [value]:
            _one_of(key, one, sorted(names))
    check_targets(cfg, given)

    _positive("optim.lr", cfg.optim.lr)
    _positive("data.batch_size", cfg.data.batch_size)
    _positive("data.eval_batch_size", cfg.data.eval_batch_size)
    _positive("data.prefetch_factor", cfg.data.prefetch_factor)
    _positive("trainer.epochs", cfg.trainer.epochs)
    _positive("trainer.accumulate_grad_batches", cfg.trainer.accumulate_grad_batches)
    _positive("trainer.log_every_n_steps", cfg.trainer.log_every_n_steps)
    _positive("trainer.sync_every_n_steps", cfg.trainer.sync_every_n_steps)
    _positive("dist.bucket_cap_mb", cfg.dist.bucket_cap_mb)
    _positive("dist.timeout_s", cfg.dist.timeout_s)
    _positive("launcher.monitor_interval", cfg.launcher.monitor_interval)
    _positive("trainer.stop_grace_s", cfg.trainer.stop_grace_s)
    _positive("logger.wandb_init_timeout_s", cfg.logger.wandb_init_timeout_s)
    _positive("checkpoint.keep_last", cfg.checkpoint.keep_last)
    if cfg.trainer.max_steps == 0 or cfg.trainer.max_steps < -1:
        fail("trainer.max_steps", cfg.trainer.max_steps, "-1 (no limit) or > 0")
    for key in ("optim.weight_decay", "optim.eps", "optim.momentum", "trainer.grad_clip",
                "trainer.label_smoothing", "data.num_workers", "sched.warmup_steps",
                "sched.min_lr", "checkpoint.every_n_epochs", "checkpoint.every_n_steps",
                "debug.limit_batches", "debug.overfit_batches", "launcher.nproc_per_node", "launcher.nnodes",
                "launcher.max_restarts", "optim.l1", "optim.lr_decay", "data.crop_padding", "data.rotate_degrees",
                "data.jitter"):
        section, name = key.split(".")
        _non_negative(key, getattr(getattr(cfg, section), name))
    for key in ("patience", "min_delta"):
        _non_negative(f"trainer.early_stopping.{key}", getattr(cfg.trainer.early_stopping, key))
    if cfg.model.init_from is not None and not Path(cfg.model.init_from).expanduser().is_file():
        fail("model.init_from", cfg.model.init_from, "no such file; give the path of a saved state_dict")
    lo_hi = cfg.data.scale_range
    if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
        fail("data.scale_range", lo_hi, "two numbers 0 < lo <= hi, e.g. [0.9, 1.1]")
    if not 0 <= cfg.trainer.label_smoothing < 1:
        fail("trainer.label_smoothing", cfg.trainer.label_smoothing, "must be in [0, 1)")
    if not 0 < cfg.data.val_fraction < 1:
        fail("data.val_fraction", cfg.data.val_fraction, "must be in (0, 1)")
    if not 0 < cfg.sched.pct_start < 1:
        fail("sched.pct_start", cfg.sched.pct_start, "must be in (0, 1)")
    if not 0 < cfg.sched.warmup_start_factor <= 1:
        fail("sched.warmup_start_factor", cfg.sched.warmup_start_factor, "must be in (0, 1]")
    if cfg.sched.name == "onecycle" and cfg.sched.warmup_steps:
        fail("sched.warmup_steps", cfg.sched.warmup_steps,
              "sched=onecycle warms up by itself (sched.pct_start); set sched.warmup_steps=0")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        fail("optim.betas", cfg.optim.betas, "two numbers in [0, 1)")
    if cfg.sched.step_size < 1:
        fail("sched.step_size", cfg.sched.step_size, "must be >= 1 (epochs)")
    for key in ("mean", "std"):
        value = getattr(cfg.data, key)
        if value is not None and (not value or (key == "std" and min(value) <= 0)):
            fail(f"data.{key}", value, "one number per channel" + (", all > 0" if key == "std" else ""))
    if cfg.trainer.device not in ("auto", "cpu", "cuda") and not cfg.trainer.device.startswith("cuda:"):
        fail("trainer.device", cfg.trainer.device, "auto, cpu, cuda or cuda:N")
    _check_endpoint(cfg.launcher.rdzv_endpoint)
    if cfg.resume not in ("auto", "none") and not cfg.resume:
        fail("resume", cfg.resume, "auto, last, none or the path of a checkpoint file")


def _check_endpoint(endpoint: str) -> None:
    """launcher.rdzv_endpoint: empty, or HOST:PORT with a port number (0: any free port)."""
    if not endpoint:
        return
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or int(port) > 65535:
        fail("launcher.rdzv_endpoint", endpoint, "HOST:PORT with a port number 0..65535 (e.g. node0:29500), or "
              "empty for this host on a free port")


def check_world(cfg: Config, world: world_env.World) -> None:
    """The checks that need the world: the global batches split evenly across ranks (so results do not
    depend on the world size), and the precision is one the device can run."""
    for key in ("batch_size", "eval_batch_size"):
        value = getattr(cfg.data, key)
        if value % world.world_size:
            fail(f"data.{key}", value,
                  f"the global batch must divide evenly by the world size {world.world_size}")
    problem = precision_problem(cfg.trainer.precision, world.device)
    if problem:
        fail("trainer.precision", cfg.trainer.precision.value, problem)


def precision_problem(precision: Precision, device) -> Optional[str]:
    """Why `device` cannot train in `precision` with this PyTorch, or None: autocast is tried on a tiny
    matmul (PyTorch turns an unsupported autocast dtype into a warning and plain fp32, silently)."""
    import warnings
    import torch
    if precision == Precision.fp32:
        return None
    dtype = torch.bfloat16 if precision == Precision.bf16 else torch.float16
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name(device)} has no bf16 support; use trainer.precision=fp16"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autocast(device.type, dtype=dtype):
                ok = (torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)).dtype == dtype
    except (RuntimeError, ValueError):
        ok = False
    return None if ok else (f"this PyTorch cannot autocast to {precision.value} on {device.type}; "
                            "use trainer.precision=fp32")


def as_dict(cfg: Any) -> Any:
    """Plain values only (enums as their names), as checkpoints and summaries store them; model and data
    as the config wrote them (`_target_` beside their keyword arguments and dtrain's keys)."""
    if isinstance(cfg, (ModelConfig, DataConfig)):
        own = {f.name: as_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name not in ("factory", "kwargs")}
        return {"_target_": cfg.factory, **own, **as_dict(cfg.kwargs)}
    if isinstance(cfg, plugins.Target):
        return as_dict(cfg.as_dict())
    if dataclasses.is_dataclass(cfg):
        return {f.name: as_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, enum.Enum):
        return cfg.value
    if isinstance(cfg, Mapping):
        return {k: as_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [as_dict(v) for v in cfg]
    return cfg
