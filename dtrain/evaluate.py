"""Evaluate a saved model: `python -m dtrain.evaluate ckpt=PATH [split=val|test|train] [data.root=...]`.

The checkpoint carries the config it was trained with, so the data and model are rebuilt from it;
`data.*`, `trainer.*` and `dist.*` overrides apply on top (a data set that moved, a different device).
The default split is `test` where the data set has one, else `val`. Prints one JSON object: split,
samples, loss and the task's metrics; for classification also the accuracy of each class
(`per_class_acc`, in the order of `classes`) and the confusion matrix (`confusion`, rows: true class,
columns: predicted). Runs under torchrun too, every sample counted once. A thin layer over
`dtrain.inference.evaluate`.
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

from dtrain import app, inference, validate
from dtrain import checkpoint as ckpt
from dtrain import world as w
from dtrain.config import Config


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
    return inference.checkpoint_config(ckpt.load(Path(ev.ckpt)), data=ev.data, trainer=ev.trainer, dist=ev.dist)


def run(world: w.World, ev: EvalConfig) -> dict:
    result = inference.evaluate(ev.ckpt, ev.split, world, data=ev.data, trainer=ev.trainer, dist=ev.dist)
    if world.is_main:
        print(json.dumps(result), flush=True)
    return result


@hydra.main(config_path=None, config_name="dtrain_evaluate", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    # Reading the EvalConfig inside `start` makes a missing ckpt= a one-line error; `run` only starts
    # once that read succeeded.
    code = app.start(lambda: checkpoint_config(validate.to_object(dcfg)),
                     lambda cfg, world: run(world, validate.to_object(dcfg)))
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
