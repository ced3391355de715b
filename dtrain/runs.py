"""Training runs started from Python: `train` (overrides, as on the command line) and `fit` (the user's own
objects), and `run_training`, the body every training entry runs once the world exists."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Iterable, Optional

from dtrain import app, build, plugins, rundir
from dtrain import world as w
from dtrain.config import Config
from dtrain.errors import EXIT_BAD_INPUT, EXIT_OK, ConfigError


class TrainingFailed(SystemExit):
    """A run from `train` or `fit` ended with a non-zero exit code, whose one-line reason was printed. A
    SystemExit: uncaught, a script exits with that code and no traceback (75 after a preemption signal,
    so a scheduler requeues it); `except TrainingFailed` catches it."""

    def __init__(self, code: int):
        super().__init__(code)

    def __str__(self) -> str:
        return f"dtrain training ended with exit code {self.code}"


def compose(*overrides: str, hydra: bool = False):
    """The composed config (a DictConfig), as the command line would compose it (app.compose)."""
    return app.compose(overrides, hydra=hydra)


def _compose_or_fail(*overrides: str):
    """compose(..., hydra=True) for a run: a config that cannot be composed is its one line and exit 2."""
    try:
        return compose(*overrides, hydra=True)
    except ConfigError as e:
        app.report(f"dtrain: error: {e}")
        raise TrainingFailed(EXIT_BAD_INPUT) from None


def make_config(*overrides: str) -> Config:
    """The typed, validated config of `python -m dtrain *overrides`."""
    return app.make_config(compose(*overrides))


def train(*overrides: str) -> dict:
    """Train in this process as `python -m dtrain *overrides` would (the same run folder, files and
    checks; under torchrun, one rank's share); the run's summary. Raises TrainingFailed on failure."""
    return train_composed(_compose_or_fail(*overrides))


def fit(model: Any, data: Any, *, loss: Any = None, metrics: Optional[dict] = None, callbacks: Iterable = (),
        collate: Any = None, overrides: Iterable[str] = ()) -> dict:
    """Train `model` on `data` with dtrain's loop, run folder, checkpoints, resume, logging and summary; the
    summary. The same script runs as `python train.py`, `torchrun --nproc_per_node=N train.py` and under
    srun, each process calling `fit` alike.

    model      an nn.Module, or a class or function returning one: it is given `input_shape`, `num_outputs`
               and (classification) `num_classes` when it takes them by name. A class or function defined in
               an importable module lets `load_model`/evaluate/predict/export rebuild the model from a
               checkpoint; for an instance, pass `load_model(ckpt, model=...)` an instance of it.
    data       a map-style Dataset of (input, target) pairs, a dict {"train": ..., "val": ..., "test": ...},
               or a function returning either; dtrain carves "val" when it is missing (see dtrain/data/user.py)
    loss       an nn.Module loss or a function (output, target) -> scalar; None: the task's own
    metrics    name -> a torchmetrics Metric or a function (output, target) -> value: extra validation metrics
    callbacks  objects with any of dtrain's hooks (dtrain/callbacks.py), in order
    collate    a function making a batch of a list of items (padding variable lengths); None: torch's default
    overrides  key=value strings as on the command line: "trainer.epochs=3", "data.batch_size=64", ...

    The checkpoint records the loss, metrics and collate given as functions an import finds, and a data
    factory (class or function) so; `dtrain.evaluate` uses them again. What it cannot record (a data set or
    loss given as an instance, a lambda, a script's own function) is given again:
    `dtrain.evaluate(ckpt, data=..., loss=..., metrics=...)`; evaluate says so in one line.
    """
    objects = build.Objects(model, data, loss, dict(metrics) if metrics is not None else None, tuple(callbacks),
                            collate)
    parts = {"model": model, "data": data}
    full = _compose_or_fail("~model", "~data", *overrides)  # dtrain's own model/data keys stay overridable
    from omegaconf import OmegaConf, open_dict
    with open_dict(full):
        for key, obj in parts.items():
            node = full[key]
            node["_target_"] = plugins.path_of(obj)  # recorded in checkpoints: what rebuilds the model
            node["name"] = node.get("name") or _name(obj)
        # functions an import finds are recorded as _target_s, so evaluate uses them again (objects.held_only:
        # what it must be given instead)
        for key, obj in (("loss", loss), ("data.collate", collate), *(
                (f"metrics.{name}", m) for name, m in (metrics or {}).items())):
            if inspect.isfunction(obj) and plugins.importable(obj):
                OmegaConf.update(full, key, {"_target_": plugins.importable(obj)}, merge=False, force_add=True)
    given = frozenset({"model", "data"} | ({"loss"} if loss is not None else set()))
    return train_composed(full, objects, given)


def _name(obj: Any) -> str:
    named = obj if inspect.isclass(obj) or inspect.isfunction(obj) else type(obj)
    return "data" if isinstance(obj, dict) else named.__name__


def train_composed(full, objects: Optional[build.Objects] = None, given: frozenset = frozenset()) -> dict:
    """Train a composed config (with Hydra's own node) in this process; the next call is a new run."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict
    with open_dict(full):
        full.hydra.run.dir = str(full.hydra.run.dir)  # resolved once: this run's folder, whatever runs next
    rundir.next_run()
    HydraConfig.instance().set_config(full)
    dcfg = full.copy()
    with open_dict(dcfg):
        del dcfg["hydra"]
    run = rundir.RunDir(Path(full.hydra.run.dir), w.from_launcher())
    result: list[dict] = []

    def body(cfg: Config, world: w.World) -> None:
        result.append(run_training(cfg, world, run, dcfg, objects))

    def make() -> Config:
        cfg = app.make_config(dcfg, given)
        rundir.check_creatable(run.path)
        rundir.note_existing(run.path)  # what existed stays if this run fails before it trains
        run.path.mkdir(parents=True, exist_ok=True)
        return cfg

    code = app.start(make, body)
    if code == EXIT_BAD_INPUT or code and not run.training_started:
        run.discard_if_resultless()
    if code != EXIT_OK:
        raise TrainingFailed(code)
    return result[0]


def run_training(cfg: Config, world: w.World, run: rundir.RunDir, dcfg,
                 objects: Optional[build.Objects] = None) -> dict:
    """The body of a training run, once the world exists: own the run folder, log, record the config, fit."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from dtrain import logs
    from dtrain.trainer import Trainer
    run.check_ranks_agree()
    run.acquire()  # before writing anything: a second job aimed at a live run's folder stops here
    try:
        logs.setup_console(world, run)
        if run.taken_over_from:
            logs.log.warning(f"run folder {run}: taking over from a job that ended without releasing it "
                             f"({run.taken_over_from})")
        hydra = HydraConfig.get()
        run.write_config(OmegaConf.to_yaml(dcfg, resolve=True), {
            "config.yaml": OmegaConf.to_yaml(dcfg), "overrides.yaml": OmegaConf.to_yaml(list(hydra.overrides.task)),
            "hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra}))})
        trainer = Trainer(build.parts(cfg, world, run, objects))
        run.training_started = True  # from here a failure leaves its record (logs, checkpoints) in the folder
        try:
            return trainer.fit()
        finally:
            trainer.close()
    finally:
        run.release()
