"""Config at the edge: the composed DictConfig becomes a typed `Config` (model and data split into dtrain's
keys and their `_target_`'s arguments), and every value is checked once, before anything is built, with
errors that name the key, the bad value and what is allowed. Past this module the code receives plain
typed values, never a DictConfig. The registries' names are passed in, so it imports none of them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dtrain import plugins
from dtrain import world as world_env
from dtrain.config import (DATA_OFFERS, MODEL_OFFERS, Config, DataConfig, ModelConfig, OptimConfig, Precision,
                           own_defaults)
from dtrain.errors import ConfigError


def to_object(cfg: DictConfig) -> Any:
    """OmegaConf.to_object, with a missing or ill-typed value reported as a one-line ConfigError."""
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{key}: {msg}" if key else msg) from e


def closest_key(key: str) -> str:
    """' (did you mean KEY?)' for a key the schema lacks, naming the closest one it has, or a hint."""
    def keys(schema: type, prefix: str = "") -> list[str]:
        out = []
        for f in dataclasses.fields(schema):
            kind = typing.get_type_hints(schema).get(f.name)
            out += keys(kind, f"{prefix}{f.name}.") if dataclasses.is_dataclass(kind) else [f"{prefix}{f.name}"]
        return out

    group = key.split(".")[0]
    free = group in ("model", "data", "loss", "metrics", "callbacks")  # their keys are their _target_'s arguments
    known = keys(Config) + [f"{g}.{k}" for g, schema in (("model", ModelConfig), ("data", DataConfig))
                            for k in own_defaults(schema)]
    close = difflib.get_close_matches(key, [k for k in known if not free or k.startswith(f"{group}.")], n=1)
    if close:
        return f" (did you mean {close[0]}?)"
    if free:
        return f" (+{key}=... adds an argument for its _target_)"
    return " (`python -m dtrain --cfg job` prints every key)"


def refuse_unknown_keys(cfg: DictConfig, schema: type, prefix: str = "") -> None:
    """A key added with `+` (`+trainer.epoch=3`) that the schema lacks would be dropped silently by
    `to_object`; refuse it like Hydra refuses an unknown key without `+`."""
    known = {f.name: f for f in dataclasses.fields(schema)}
    types = typing.get_type_hints(schema)  # the annotations, resolved in the schema's own module
    for key in cfg.keys():
        name = f"{prefix}{key}"
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {prefix}{close[0]}? " if close else ""
            raise ConfigError(f"{name}: no such key ({hint}`python -m dtrain --cfg job` prints every key)")
        node = cfg._get_node(key)
        kind = types.get(key)
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
    obj.optim = typed_part("optim", OptimConfig, obj.optim, {})
    if obj.optim.factory:  # an optimizer class of the user's own is named after it
        obj.optim.name = plugins.short_name(obj.optim.factory).lower()
    obj.loss = plugins.from_node("loss", obj.loss) if obj.loss is not None else None
    if obj.data.collate is not None:
        obj.data.collate = plugins.from_node("data.collate", obj.data.collate)
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
            fail("data.task", cfg.data.task, f"data={cfg.data.name} decides its own task; data.task is "
                 "for data=csv and your own data sets")
        if hasattr(builder, "dtrain_check"):  # dtrain's own data sets check their arguments here
            builder.dtrain_check(cfg.data)
    if cfg.loss is not None and "loss" not in given:
        plugins.check_callable("loss", cfg.loss, positional=2)
    if cfg.data.collate is not None:
        plugins.check_callable("data.collate", cfg.data.collate, positional=1)
    for name, target in cfg.metrics.items():
        plugins.check_callable(f"metrics.{name}", target, positional=2)
    for name, target in cfg.callbacks.items():
        plugins.check(f"callbacks.{name}", target.path, target.kwargs)


POSITIVE = ("optim.lr", "data.batch_size", "data.eval_batch_size", "data.prefetch_factor", "trainer.epochs",
            "trainer.accumulate_grad_batches", "trainer.log_every_n_steps", "trainer.sync_every_n_steps",
            "dist.bucket_cap_mb", "dist.timeout_s", "launcher.monitor_interval", "trainer.stop_grace_s",
            "logger.wandb_init_timeout_s", "checkpoint.keep_last")
NON_NEGATIVE = ("optim.weight_decay", "optim.eps", "optim.momentum", "trainer.grad_clip", "trainer.label_smoothing",
                "data.num_workers", "sched.warmup_steps", "sched.min_lr", "checkpoint.every_n_epochs",
                "checkpoint.every_n_steps", "trainer.val_every_n_steps", "debug.limit_batches", "debug.overfit_batches",
                "launcher.nproc_per_node", "launcher.nnodes", "launcher.max_restarts", "optim.l1", "optim.lr_decay",
                "data.crop_padding", "data.rotate_degrees", "data.jitter", "trainer.early_stopping.patience",
                "trainer.early_stopping.min_delta")
# key -> (lowest, highest, whether each end is allowed, what to say)
INTERVALS = {"trainer.label_smoothing": (0, 1, (True, False), "must be in [0, 1)"),
             "data.val_fraction": (0, 1, (False, False), "must be in (0, 1)"),
             "sched.pct_start": (0, 1, (False, False), "must be in (0, 1)"),
             "sched.warmup_start_factor": (0, 1, (False, True), "must be in (0, 1]")}


def get(cfg: Config, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def validate(cfg: Config, choices: Mapping[str, Sequence[str]], given: frozenset[str] = frozenset()) -> None:
    """Check every value once, before anything is built. Raises ConfigError naming the key."""
    for key, names in choices.items():  # "optim": optim.name; "data.augment": each name in the list
        if key == "optim" and cfg.optim.factory:  # an optimizer class of the user's own: its _target_ checks it
            continue
        value = get(cfg, key if "." in key else f"{key}.name")
        for one in value if isinstance(value, list) else [value]:
            _one_of(key, one, sorted(names))
    check_targets(cfg, given)
    for key in POSITIVE:
        _positive(key, get(cfg, key))
    for key in NON_NEGATIVE:
        _non_negative(key, get(cfg, key))
    for key, (lo, hi, (lo_in, hi_in), allowed) in INTERVALS.items():
        v = get(cfg, key)
        if not ((lo <= v if lo_in else lo < v) and (v <= hi if hi_in else v < hi)):
            fail(key, v, allowed)
    _check_values(cfg)
    _check_strategy(cfg)
    _check_endpoint(cfg.launcher.rdzv_endpoint)


def _check_strategy(cfg: Config) -> None:
    """The strategy's own rules (dtrain/strategy), and what needs distributed checkpoints."""
    from dtrain import strategy
    strategy.check(cfg)
    if cfg.checkpoint.async_save and strategy.checkpoint_format(cfg) != "dcp":
        fail("checkpoint.async_save", True, "needs distributed checkpoints: checkpoint.format=dcp (the default "
             "under dist.strategy=fsdp)")


def _check_values(cfg: Config) -> None:
    """The values whose rule is their own."""
    from dtrain import tasks
    if cfg.data.task is not None:
        tasks.get(cfg.data.task)
    tasks.check_monitor(cfg.checkpoint.monitor)
    if cfg.trainer.max_steps == 0 or cfg.trainer.max_steps < -1:
        fail("trainer.max_steps", cfg.trainer.max_steps, "-1 (no limit) or > 0")
    if cfg.model.init_from is not None and not Path(cfg.model.init_from).expanduser().exists():
        fail("model.init_from", cfg.model.init_from, "no such file; give the path of a saved state_dict")
    lo_hi = cfg.data.scale_range
    if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
        fail("data.scale_range", lo_hi, "two numbers 0 < lo <= hi, e.g. [0.9, 1.1]")
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
    from dtrain import strategy
    ranks = strategy.resolve(cfg.dist.strategy).data_parallel_size(cfg, world)
    for key in ("batch_size", "eval_batch_size"):
        value = getattr(cfg.data, key)
        if value % ranks:
            fail(f"data.{key}", value, f"the global batch must divide evenly by the world size {world.world_size}"
                 + (f" ({ranks} data-parallel ranks)" if ranks != world.world_size else ""))
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
