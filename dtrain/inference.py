"""Using a trained model: rebuild it from a checkpoint (`load_model`, with the preprocessing it was trained
with), evaluate it on a split, and read what a run folder recorded. dtrain.predict and dtrain.export use
these; none of them imports the training side (the composition root and the loop)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import nn

from dtrain import app, models, objective, plugins
from dtrain import data as data_module
from dtrain import checkpoint as ckpt
from dtrain import world as w
from dtrain.config import Config
from dtrain.errors import BadInput, CheckpointError, ConfigError
from dtrain.rundir import METRICS, SUMMARY


def build_model(name: str, data_name: str = "mnist_sample", *overrides: str) -> nn.Module:
    """A freshly initialised model `name` sized for `data_name` (its input shape and classes)."""
    cfg = app.make_config(app.compose([f"model={name}", f"data={data_name}", *overrides]))
    splits = data_module.build(cfg.data, w.World())
    return models.build(cfg.model, splits.task, splits.shape, splits.out, cfg.data.name)


@dataclass
class Model:
    """A trained model for inference: eval mode, on `device`, with the preprocessing it was trained with."""
    net: nn.Module
    config: Config
    info: dict  # data.Splits.describe(): task, shape, out, classes, images, mean, std, resize
    device: torch.device
    ckpt: str

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """A batch as the model was trained on it: image pixels (uint8 0..255, or floats 0..1) scaled and
        normalised per channel; table features standardised with the training split's mean and std."""
        x = torch.as_tensor(x).to(self.device)
        images = self.info["images"]
        if images and x.dtype == torch.uint8:
            x = x / 255
        elif images and x.numel() and not (x.min() >= 0 and x.max() <= 1):  # NaN fails too
            raise BadInput(f"float image inputs must be pixels scaled to 0..1, but these range from "
                           f"{float(x.min()):.4g} to {float(x.max()):.4g}; give uint8 pixels (0..255) or divide "
                           "them by 255")
        dtype = self.info.get("input_dtype")  # a user's data set's inputs keep their dtype (token ids, ...)
        x = x.to(getattr(torch, dtype)) if dtype and not images else x.float()
        if self.info["mean"] is not None:
            shape = (-1, 1, 1) if images else (-1,)  # per channel, or per feature
            x = (x - torch.tensor(self.info["mean"], device=self.device).view(shape)) / \
                torch.tensor(self.info["std"], device=self.device).view(shape)
        return x

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Raw outputs (logits or regression values) for a batch of raw inputs [N, *shape]."""
        shape = tuple(self.info["shape"])
        if tuple(x.shape[1:]) != shape:
            raise BadInput(f"inputs of shape {list(x.shape)} do not fit this model, which takes "
                           f"[N, {', '.join(map(str, shape))}]")
        return self.net(self.preprocess(x)).float()

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities (classification) or values (regression) for a batch of raw inputs."""
        from dtrain import tasks
        return tasks.get(self.info["task"]).predict(self(x))


def load_model(path: str | Path, device: str = "cpu", model: Optional[nn.Module] = None) -> Model:
    """A checkpoint's model for inference, with its training preprocessing (stored in the checkpoint;
    rebuilt from its data config for checkpoints older than that). The model is rebuilt from the
    `_target_` and arguments the checkpoint records (its package must be importable), or is `model`: an
    instance of the same class to load the weights into (for a model dtrain.fit was given as an object)."""
    state = ckpt.load(Path(path))
    try:
        cfg = checkpoint_config(state, given=frozenset({"model"}) if model is not None else frozenset())
        info = state.get("data") or data_module.build(cfg.data, w.World()).describe()
        net = model if model is not None else \
            models.build(cfg.model, info["task"], tuple(info["shape"]), info["out"], cfg.data.name)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {path}: its model cannot be rebuilt: {e}") from e
    try:
        models.load_weights(net, cfg.model.name, ckpt.weights(state))
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit model={cfg.model.name} ({str(e).splitlines()[0]}); "
                              "for a model dtrain.fit was given as an instance, pass one built as it was: "
                              "model=...") from e
    dev = torch.device(device)
    return Model(net.to(dev).eval(), cfg, info, dev, str(path))


def checkpoint_config(state: dict, given: frozenset = frozenset(), **sections: dict) -> Config:
    """The config a checkpoint was trained with, `sections` (data=..., trainer=..., dist=...) on top, and
    without its callbacks (using a model needs none of them, nor their packages)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), state["config"], {**sections, "resume": "none"})
        OmegaConf.update(merged, "callbacks", {}, merge=False)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{getattr(e, 'full_key', '') or 'override'}: {str(e).splitlines()[0]}") from e
    return app.make_config(merged, given)


def evaluate(path: str | Path, split: str = "auto", world: Optional[w.World] = None, *, model: Any = None,
             data: Any = None, loss: Any = None, metrics: Optional[dict] = None, collate: Any = None,
             **sections: dict) -> dict:
    """Loss and metrics of a checkpoint on a split (`auto`: test where the data set has one, else val),
    every sample counted once across ranks; classification adds per-class accuracy and the confusion
    matrix (rows: true class), segmentation per-class IoU; a model with its own step reports what its
    validation_step returns. `sections` override the checkpoint's config (data={"root": ...}). A run of
    dtrain.fit is evaluated with the loss, metrics and collate it recorded; what it could not record (an
    instance, a script's own function) is passed here as fit was given it: model=, data= (a data set, a dict
    of splits or a factory), loss=, metrics=, collate=."""
    from dtrain.strategy.base import autocast
    from dtrain import tasks
    from dtrain.evaluation import evaluate as run_evaluation, evaluate_own
    from dtrain.steps import has_own_step
    world = world or w.World()
    state = ckpt.load(Path(path))
    if data is not None and not _is_data(data):
        sections["data"], data = data, None  # config values, not a data set
    given = {"model": model, "data": data, "loss": loss, "metrics": metrics, "collate": collate}
    _check_given(path, state.get("objects", ()), given)
    stored = state.get("data") or {}
    if stored.get("mean") is not None and not {"mean", "std"} & set(sections.get("data", {})):
        # the training split's statistics, also on other files (data.path=...) or a moved data set
        sections["data"] = {**sections.get("data", {}), "mean": stored["mean"], "std": stored["std"]}
    cfg = checkpoint_config(state, frozenset(k for k in ("model", "data", "loss") if given[k] is not None), **sections)
    splits = data_module.build(cfg.data, world, plugins.called(data, {"options": cfg.data, "world": world}))
    names = tasks.get(splits.task).class_names(splits.class_names, splits.out)
    if stored.get("classes") is not None and names != stored["classes"]:  # other labels, or another vocabulary
        raise BadInput(f"data={cfg.data.name}: its classes ({_few(names)}) are not those the checkpoint {path} was "
                       f"trained on ({_few(stored['classes'])}); evaluate on data with the same classes")
    have = [s for s in ("train", "val", "test") if getattr(splits, s) is not None]
    split = split if split != "auto" else have[-1]
    if split not in have:
        raise ConfigError(f"split={split!r} is not available for data={cfg.data.name}; choose one of "
                          + ", ".join(["auto", *have]))
    net = load_model(path, str(world.device), model=model).net
    loader = data_module.eval_loader(getattr(splits, split), cfg, world, data_module.collate_of(cfg.data, collate))
    precision = lambda: autocast(world.device, cfg.trainer.precision)  # noqa: E731
    if has_own_step(net):
        result = evaluate_own(net, lambda method, batch: getattr(net, method)(batch), loader, world, precision)
    else:
        task = tasks.get(splits.task)
        result = run_evaluation(net, loader, task, world, precision, objective.make_loss(cfg, task, loss),
                                classes=splits.out, extra=objective.make_metrics(cfg, metrics, world.device))
    if "confusion" in result:
        rows = result["confusion"]
        result["classes"] = splits.class_names or [str(i) for i in range(splits.out)]
        result["per_class_acc"] = [row[i] / max(sum(row), 1) for i, row in enumerate(rows)]
    return {"ckpt": str(path), "split": split, "model": cfg.model.name, "data": cfg.data.name, **result}


def _few(names: list) -> str:
    return ", ".join(map(repr, names[:5])) + (f", ... {len(names)} in all" if len(names) > 5 else "")


def _is_data(value: Any) -> bool:
    """A data set, a dict of them or a factory (as dtrain.fit takes), rather than a dict of data config values."""
    return not isinstance(value, Mapping) or any(isinstance(v, torch.utils.data.Dataset) for v in value.values())


def _check_given(path: str | Path, held: Iterable[str], given: Mapping[str, Any]) -> None:
    """What dtrain.fit was given and its checkpoint cannot rebuild must be given again: one line naming it."""
    missing = [name for name in held if given[name.split(".")[0]] is None]
    if missing:
        keys = ", ".join(dict.fromkeys(f"{name.split('.')[0]}=..." for name in missing))
        raise BadInput(f"checkpoint {path} was trained by dtrain.fit with its own {', '.join(missing)}, which it "
                       f"cannot rebuild (an instance, or defined in a script); evaluate it from Python as fit was "
                       f"given them: dtrain.evaluate(ckpt, {keys})")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """A run folder's metrics.jsonl: one dict per epoch."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        raise BadInput(f"{run_dir} has no metrics.jsonl: not a dtrain run folder, or no epoch finished yet")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_summary(run_dir: str | Path) -> dict:
    path = Path(run_dir) / SUMMARY
    if not path.exists():
        raise BadInput(f"{run_dir} has no summary.json: not a dtrain run folder, or the run has not finished")
    return json.loads(path.read_text())
