"""Evaluate a saved model: `python -m dtrain.evaluate ckpt=PATH [split=test|val|train] [data.root=...]`.

The checkpoint carries the config it was trained with, so the data and model are rebuilt from it;
`data.*` and `trainer.*` overrides apply on top (a data set that moved, a different device).
Prints one JSON object: split, samples, loss and, for classification, accuracy. Runs under torchrun too.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from dtrain import checkpoint as ckpt
from dtrain import config, data, models
from dtrain import world as w
from dtrain.__main__ import guarded
from dtrain.config import Config, ConfigError
from dtrain.trainer import evaluate, loss_function


@dataclass
class EvalConfig:
    defaults: list[Any] = field(default_factory=lambda: [{"override hydra/job_logging": "none"}, "_self_"])
    ckpt: str = MISSING
    split: str = "test"
    data: dict[str, Any] = field(default_factory=dict)  # overrides of the checkpoint's data config
    trainer: dict[str, Any] = field(default_factory=dict)
    hydra: Any = field(default_factory=lambda: {"run": {"dir": "."}, "output_subdir": None})


ConfigStore.instance().store(name="dtrain_evaluate", node=EvalConfig)


def run(ev: EvalConfig) -> dict:
    state = ckpt.load(Path(ev.ckpt))
    merged = OmegaConf.merge(OmegaConf.structured(Config), state["config"],
                             {"data": ev.data, "trainer": ev.trainer, "resume": "none"})
    cfg = config.to_config(merged)
    world = w.from_env(cfg.trainer.device, cfg.dist.backend)
    config.check_batch_split(cfg, world.world_size)
    with w.process_group(world, cfg.dist.timeout_s):
        splits = data.build(cfg.data, world)
        have = [s for s in ("train", "val", "test") if getattr(splits, s) is not None]
        if ev.split not in have:
            raise ConfigError(f"split={ev.split!r} is not available for data={cfg.data.name}; choose one of "
                              + ", ".join(have))
        dataset = getattr(splits, ev.split)
        model = models.build(cfg.model.name, splits.task, splits.shape, splits.out, cfg.data.name)
        model.load_state_dict(state["model"])
        result = evaluate(model.to(world.device), data.eval_loader(dataset, cfg, world),
                          loss_function(splits.task, cfg.trainer.label_smoothing), splits.task, world,
                          cfg.trainer.precision)
        result = {"ckpt": ev.ckpt, "split": ev.split, "model": cfg.model.name, "data": cfg.data.name, **result}
        if world.is_main:
            print(json.dumps(result), flush=True)
        del model, dataset, splits
        return result


@hydra.main(config_path=None, config_name="dtrain_evaluate", version_base="1.3")
def main(dcfg) -> None:
    code = guarded(lambda: run(config.to_object(dcfg)) and 0, w.World(rank=w.env_rank()))
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
