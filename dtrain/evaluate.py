"""Evaluate a saved model: `python -m dtrain.evaluate ckpt=PATH [split=val|test|train] [data.root=...]`.

The checkpoint carries the config it was trained with, so the data and model are rebuilt from it;
`data.*`, `trainer.*` and `dist.*` overrides apply on top (a data set that moved, a different device).
The default split is `test` where the data set has one, else `val`. Prints one JSON object: split,
samples, loss and the task's metrics (accuracy for classification). Runs under torchrun too.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dtrain import app, config, data, models
from dtrain import checkpoint as ckpt
from dtrain import world as w
from dtrain.config import Config
from dtrain.errors import CheckpointError, ConfigError
from dtrain.tasks import TASKS, evaluate


@dataclass
class EvalConfig:
    defaults: list[Any] = field(default_factory=lambda: [{"override hydra/job_logging": "none"}, "_self_"])
    ckpt: str = MISSING
    split: str = "auto"  # auto: test where the data set has one, else val
    # Overrides of the checkpoint's own config, checked against its schema once merged.
    data: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    dist: dict[str, Any] = field(default_factory=dict)
    hydra: Any = field(default_factory=lambda: {"run": {"dir": "."}, "output_subdir": None})


def _schema() -> DictConfig:
    node = OmegaConf.structured(EvalConfig)
    for key in ("data", "trainer", "dist"):  # free-form here, so `data.root=...` needs no `+`
        OmegaConf.set_struct(node[key], False)
    return node


ConfigStore.instance().store(name="dtrain_evaluate", node=_schema())


def checkpoint_config(ev: EvalConfig) -> Config:
    """The config the checkpoint was trained with, the user's overrides on top."""
    state = ckpt.load(Path(ev.ckpt))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), state["config"],
                                 {"data": ev.data, "trainer": ev.trainer, "dist": ev.dist, "resume": "none"})
    except OmegaConfBaseException as e:
        raise ConfigError(f"{getattr(e, 'full_key', '') or 'override'}: {str(e).splitlines()[0]}") from e
    return app.make_config(merged)


def run(cfg: Config, world: w.World, ev: EvalConfig) -> dict:
    splits = data.build(cfg.data, world)
    have = [s for s in ("train", "val", "test") if getattr(splits, s) is not None]
    split = ev.split if ev.split != "auto" else have[-1]
    if split not in have:
        raise ConfigError(f"split={split!r} is not available for data={cfg.data.name}; choose one of "
                          + ", ".join(["auto", *have]))
    model = models.build(cfg.model.name, splits.task, splits.shape, splits.out, cfg.data.name)
    try:
        model.load_state_dict(ckpt.load(Path(ev.ckpt))["model"])
    except RuntimeError as e:  # e.g. data.* overrides that change the input shape
        raise CheckpointError(f"checkpoint {ev.ckpt} does not fit model={cfg.model.name} on this data "
                              f"({str(e).splitlines()[0]})") from e
    result = evaluate(model.to(world.device), data.eval_loader(getattr(splits, split), cfg, world),
                      TASKS[splits.task], world, cfg.trainer.precision, cfg.trainer.label_smoothing)
    result = {"ckpt": ev.ckpt, "split": split, "model": cfg.model.name, "data": cfg.data.name, **result}
    if world.is_main:
        print(json.dumps(result), flush=True)
    return result


@hydra.main(config_path=None, config_name="dtrain_evaluate", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    # Reading the EvalConfig inside `start` makes a missing ckpt= a one-line error; `run` only starts
    # once that read succeeded.
    code = app.start(lambda: checkpoint_config(config.to_object(dcfg)),
                     lambda cfg, world: run(cfg, world, config.to_object(dcfg)))
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
