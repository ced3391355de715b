"""Typed config schemas (Hydra structured configs registered in the ConfigStore). Hydra checks types and
unknown keys while composing; dtrain/validate.py turns the composed config into a `Config` and checks every
value once."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from dtrain import plugins, rundir


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


class CheckpointFormat(str, enum.Enum):
    auto = "auto"  # the strategy's own: dcp under dist.strategy=fsdp, else file
    file = "file"  # one step-<N>.pt file, written by the main rank
    dcp = "dcp"  # a step-<N>/ folder every rank writes its shards into (torch.distributed.checkpoint)


class OptimImpl(str, enum.Enum):
    auto = "auto"  # fused where PyTorch has the kernel for the optimizer, device and strategy, else foreach
    fused = "fused"  # one kernel updates every parameter
    foreach = "foreach"  # one op per step over the list of parameters
    loop = "loop"  # one op per parameter (PyTorch's reference implementation)


class WandbMode(str, enum.Enum):
    online = "online"  # falls back to offline, with a warning, when the service cannot be reached
    offline = "offline"  # written under <run>/wandb/; `wandb sync` uploads it later
    disabled = "disabled"


class Mode(str, enum.Enum):  # which way the monitored metric improves
    auto = "auto"  # lower is better for names ending in loss or perplexity, else higher
    min = "min"
    max = "max"


@dataclass
class ModelConfig:
    """`model`: `_target_` (any callable returning an nn.Module) and its keyword arguments, beside dtrain's
    own keys below; dtrain's keys are never passed to the callable, every other key is (`kwargs`)."""
    name: str = ""  # what the run is named after; "": the last part of _target_
    sync_batchnorm: bool = False  # convert BatchNorm to SyncBatchNorm under DDP
    init_from: Optional[str] = None  # a saved state_dict (or dtrain checkpoint) to start from, not random weights
    # Classes of the model's blocks: what activation checkpointing recomputes and FSDP shards on its own
    # (None: dtrain's own models name theirs; a user's model has none, so the whole model is one block)
    blocks: Optional[list[str]] = None
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
    # a task's name (dtrain/tasks: classification, regression, ...): data=csv needs it; for your own data set it
    # overrides what the targets' dtype says (integers: classification)
    task: Optional[str] = None
    # {_target_: pkg.mod.fn}: how a list of items becomes a batch in the DataLoader (padding variable lengths);
    # null: torch's default_collate (dtrain.fit takes collate=fn)
    collate: Any = None
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
    implementation: OptimImpl = OptimImpl.auto  # the summary's optimizer_implementation says which ran
    l1: float = 0.0  # L1 penalty: l1 * sum(|w|) over all parameters added to the loss (reported as l1_penalty)
    # Parameter groups: [{params: GLOB, ...options}], globs over named_parameters() names, the first match
    # wins, the rest in the default group; options are any the optimizer takes (lr, weight_decay, ...)
    param_groups: list = field(default_factory=list)
    factory: Optional[str] = None  # `_target_`: an optimizer class of your own (torch.optim.NAdam, ...)
    kwargs: dict = field(default_factory=dict)  # its other keyword arguments


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
    activation_checkpointing: bool = False  # recompute each block's activations in backward instead of keeping them
    sync_every_n_steps: int = 10  # DDP: ranks agree on a stop signal every N optimizer steps (one tiny all-reduce)
    # validate every N optimizer steps as well as at each epoch's end (0: at epoch ends only): a metrics.jsonl
    # line, the best checkpoint's choice and early stopping each time, and a (mid-epoch) checkpoint
    val_every_n_steps: int = 0
    profile: bool = False  # torch.profiler trace of a few early steps, per rank, in <run>/profile/
    stop_grace_s: float = 20.0  # after SIGTERM/SIGUSR1, exit anyway if no clean stop came by then
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


@dataclass
class FsdpConfig:  # dist.strategy=fsdp
    shard: Optional[list[str]] = None  # classes of the submodules sharded on their own (None: the model's default:
    # dtrain's own name theirs, a user's model has the root alone)
    reshard_after_forward: bool = True  # free gathered parameters after each block's forward (gather again in backward)
    meta_init: bool = False  # build on the meta device, materialise only each rank's shards (no rank holds the model)


@dataclass
class DistConfig:
    backend: Backend = Backend.auto
    timeout_s: float = 300.0  # collectives and forming the world
    # ddp: DistributedDataParallel (every rank holds the whole model); fsdp: FSDP2 (parameters, gradients and
    # optimizer state sharded); or the dotted path of a dtrain.strategy.Strategy subclass of your own
    strategy: str = "ddp"
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)
    # tensor parallelism (dist.strategy=fsdp): world/tp data-parallel groups of tp ranks on a 2-D mesh
    # ("dp", "tp"); FSDP2 shards over dp. 1: none
    tp: int = 1
    # [{module: GLOB, style: colwise|rowwise|sequence}] over named_modules() names; None: the model's own
    # tp_plan (model=gpt has one)
    tp_plan: Optional[list[Any]] = None
    # with dist.tp > 1: norms and dropout on slices of the sequence (dim 1) instead of the whole of it on every
    # tp rank (the model's own plan; in dist.tp_plan, the modules of style sequence)
    sequence_parallel: bool = False
    # with dist.tp > 1: the output head split over the vocabulary and the cross-entropy computed on the split
    # logits, never gathered for the loss (the model's own plan, as model=gpt's)
    loss_parallel: bool = False
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
    # the validation metric the best checkpoint and early stopping follow: val_loss, val_acc, val_f1, val_auc,
    # a metric of your own val_NAME, ...; auto: the task's own (val_acc for classification, val_loss else)
    monitor: str = "auto"
    mode: Mode = Mode.auto  # which way it improves (auto: min for names ending in loss or perplexity, else max)
    allow_config_change: bool = False  # resume although training values changed (noted in config-changes.jsonl)
    format: CheckpointFormat = CheckpointFormat.auto
    async_save: bool = False  # dcp: write in the background while training goes on


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
    # optim is dtrain's optimizer by name (optim.name) with its keys, or `_target_` an optimizer class of your own
    # with its keyword arguments: composed as a plain dict, typed as OptimConfig by `to_config`
    optim: Any = field(default_factory=lambda: own_defaults(OptimConfig))
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


# dtrain's own models and data sets, by name -> their `_target_` (conf/model/NAME.yaml and conf/data/NAME.yaml
# name the same; this table reads configs saved before `_target_` existed). Plain names here, so that reading
# a config imports neither the models nor the data sets.
BUILTIN_MODELS = {name: f"dtrain.models.{name}" for name in ("mlp", "mlp3", "lenet", "convnet", "resnet18", "linear",
                                                               "gpt")}
BUILTIN_DATA = {"mnist_sample": "dtrain.data.mnist_sample", "mnist": "dtrain.data.mnist",
                "cifar10": "dtrain.data.cifar10", "imagefolder": "dtrain.data.imagefolder",
                "synthetic": "dtrain.data.synthetic", "regression": "dtrain.data.regression",
                "csv": "dtrain.data.csv_table", "text": "dtrain.data.text"}

MODEL_OFFERS = ("input_shape", "num_outputs", "num_classes", "vocab_size")  # what dtrain may pass a model factory
DATA_OFFERS = ("options", "world")  # what dtrain passes a data factory that takes it


def as_dict(cfg: Any) -> Any:
    """Plain values only (enums as their names), as checkpoints and summaries store them; model and data
    as the config wrote them (`_target_` beside their keyword arguments and dtrain's keys)."""
    if isinstance(cfg, (ModelConfig, DataConfig, OptimConfig)):
        own = {f.name: as_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
               if f.name not in ("factory", "kwargs")}
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


def flat(d: Mapping, prefix: str = "") -> dict:
    """A nested dict (as `as_dict` gives) as dotted keys: {"optim.lr": 0.001, ...}."""
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
    return out


class ReadOnly:
    """A config seen through a window that cannot be written: what callbacks get as `trainer.cfg` (the run's
    config is validated once; a callback that changed it would make the run disagree with its own record)."""
    __slots__ = ("_of",)

    def __init__(self, of: Any):
        object.__setattr__(self, "_of", of)

    def __getattr__(self, name: str) -> Any:
        return read_only(getattr(self._of, name))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"trainer.cfg is read-only: {name} cannot be set from a callback (the config is the "
                             "run's record; change it with an override)")

    def __repr__(self) -> str:
        return f"ReadOnly({self._of!r})"


def read_only(value: Any) -> Any:
    """`value` that cannot be changed through: dataclasses behind ReadOnly, dicts and lists frozen."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return ReadOnly(value)
    if isinstance(value, Mapping):
        import types
        return types.MappingProxyType({k: read_only(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(read_only(v) for v in value)
    return value
