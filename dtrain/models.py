"""dtrain's own workloads, named in conf/model/NAME.yaml by `_target_` exactly as a user's model is: each
factory takes the data's `input_shape` and `num_outputs` (dtrain passes them) and its own options.

The layers carry the names of the PyTorch tutorials' classes (`fc1`, `conv1`, `linear`, ...), so a
state_dict saved by dtrain loads with strict=True into the tutorial's own class and the other way round
(`model.init_from`); parameter-free layers (ReLU, pooling, dropout) add no keys, so options such as
`model.dropout` leave the names alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dtrain import plugins
from dtrain.config import BUILTIN_MODELS, ModelConfig
from dtrain.errors import ConfigError


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p else nn.Identity()


class MLP(nn.Module):
    """fc1 -> ReLU -> ... -> fcN on flattened inputs: `mlp` is the MNIST SimpleNet (784->128->10), `mlp3`
    the 3-layer Net (784->128->64->10). Dropout follows every hidden ReLU."""

    def __init__(self, inputs: int, hidden: tuple[int, ...], out: int, dropout: float = 0.0):
        super().__init__()
        sizes = (inputs, *hidden, out)
        self.depth = len(sizes) - 1
        for i in range(self.depth):
            self.add_module(f"fc{i + 1}", nn.Linear(sizes[i], sizes[i + 1]))
        self.dropout = _dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i in range(1, self.depth):
            x = self.dropout(F.relu(getattr(self, f"fc{i}")(x)))
        return getattr(self, f"fc{self.depth}")(x)


def _flat_size(features: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        return features(torch.zeros(1, *shape)).numel()


class LeNet(nn.Module):
    """The CIFAR-10 tutorial's `Net` (LeNet-5): conv1 C->6 k5, pool 2, conv2 6->16 k5, pool 2, fc1 ->120,
    fc2 120->84, fc3 84->classes. fc1's input follows the image size (400 for 32x32, 256 for 28x28)."""

    def __init__(self, shape: tuple[int, ...], out: int, dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(shape[0], 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(_flat_size(self.features, shape), 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, out)
        self.dropout = _dropout(dropout)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        return self.pool(F.relu(self.conv2(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(F.relu(self.fc1(self.features(x))))
        x = self.dropout(F.relu(self.fc2(x)))
        return self.fc3(x)


class ConvNet(nn.Module):
    """The CIFAR-10 tutorial's `CNN`: conv1 C->64 k3 p1, pool, conv2 64->128 k3 p1, pool, fc1 ->256, fc2
    256->classes; with `batchnorm` (dtrain's default) a BatchNorm (bn1, bn2) after each convolution."""

    def __init__(self, shape: tuple[int, ...], out: int, dropout: float = 0.0, batchnorm: bool = True):
        super().__init__()
        norm = nn.BatchNorm2d if batchnorm else (lambda channels: nn.Identity())
        self.conv1, self.bn1 = nn.Conv2d(shape[0], 64, 3, padding=1), norm(64)
        self.conv2, self.bn2 = nn.Conv2d(64, 128, 3, padding=1), norm(128)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(_flat_size(self.features, shape), 256)
        self.fc2 = nn.Linear(256, out)
        self.dropout = _dropout(dropout)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        return self.pool(F.relu(self.bn2(self.conv2(x)))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.relu(self.fc1(self.features(x)))))


class Linear(nn.Module):
    """The regression tutorial's `LinearModel`: one `linear` layer on the (flattened) features."""

    def __init__(self, inputs: int, out: int):
        super().__init__()
        self.linear = nn.Linear(inputs, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def resnet18(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    from torchvision.models import resnet18 as tv_resnet18  # imported here: torchvision is slow to import
    net = tv_resnet18(num_classes=num_outputs)
    # Small-image stem (CIFAR-style): a 3x3 stride-1 conv and no max-pool keep 32x32 inputs informative.
    net.conv1 = nn.Conv2d(input_shape[0], 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def mlp(input_shape: tuple[int, ...], num_outputs: int, dropout: float = 0.0) -> nn.Module:
    """The MNIST tutorial's SimpleNet: fc1 ->128, fc2 -> outputs."""
    return MLP(math.prod(input_shape), (128,), num_outputs, dropout)


def mlp3(input_shape: tuple[int, ...], num_outputs: int, dropout: float = 0.0) -> nn.Module:
    """The MNIST tutorial's 3-layer Net: fc1 ->128, fc2 ->64, fc3 -> outputs."""
    return MLP(math.prod(input_shape), (128, 64), num_outputs, dropout)


def lenet(input_shape: tuple[int, ...], num_outputs: int, dropout: float = 0.0) -> nn.Module:
    return LeNet(input_shape, num_outputs, dropout)


def convnet(input_shape: tuple[int, ...], num_outputs: int, dropout: float = 0.0,
            batchnorm: Optional[bool] = True) -> nn.Module:
    return ConvNet(input_shape, num_outputs, dropout, True if batchnorm is None else batchnorm)


def linear(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    return Linear(math.prod(input_shape), num_outputs)


def gpt(input_shape: tuple[int, ...], vocab_size: int, n_layer: int = 4, n_head: int = 4, n_embd: int = 128,
        block_size: int = 0, dropout: float = 0.0, bias: bool = True, tie_weights: bool = True) -> nn.Module:
    """A nanoGPT-style decoder (dtrain/gpt.py) for windows of input_shape[0] tokens; block_size 0: that length."""
    from dtrain.gpt import GPT
    window = input_shape[0] if input_shape else 0
    if block_size and window > block_size:
        raise ConfigError(f"model.block_size={block_size} is shorter than the data's windows of {window} tokens; "
                          f"set model.block_size >= {window} (or 0: the data's)")
    return GPT(vocab_size, block_size or window, n_layer, n_head, n_embd, dropout, bias, tie_weights)


def _check_gpt(cfg: ModelConfig) -> None:
    _check_dropout(cfg)
    n_embd, n_head = cfg.kwargs.get("n_embd", 128), cfg.kwargs.get("n_head", 4)
    for key in ("n_layer", "n_head", "n_embd"):
        if cfg.kwargs.get(key, 1) < 1:
            raise ConfigError(f"model.{key}={cfg.kwargs[key]!r} is not allowed: must be >= 1")
    if n_embd % n_head:
        raise ConfigError(f"model.n_embd={n_embd} does not divide into model.n_head={n_head} heads; choose a width "
                          "that is a multiple of the head count")


def _check_dropout(cfg: ModelConfig) -> None:
    p = cfg.kwargs.get("dropout", 0.0)
    if not 0 <= p < 1:
        raise ConfigError(f"model.dropout={p!r} is not allowed: must be in [0, 1)")


for _factory in (mlp, mlp3, lenet, convnet):
    _factory.dtrain_check = _check_dropout
gpt.dtrain_check = _check_gpt


@dataclass(frozen=True)
class Spec:
    """What dtrain knows of its own models beyond their `_target_` (conf/model/NAME.yaml names it)."""
    task: str  # the task it solves
    rank: int | None = None  # the input rank it needs: None = any, 3 = C x H x W images
    # Layer names of dtrain before the tutorial names (nn.Sequential indices): old checkpoints still load.
    legacy: Mapping[str, str] | None = None
    # Its blocks, by class: what dist.strategy=fsdp shards on its own and activation checkpointing recomputes
    blocks: tuple[str, ...] = ("Linear",)


# dtrain's own models, registered the way a user's are: conf/model/NAME.yaml has `_target_: dtrain.models.NAME`.
MODELS: dict[str, Spec] = {
    "mlp": Spec("classification", legacy={"1.": "fc1.", "3.": "fc2."}),
    "mlp3": Spec("classification", legacy={"1.": "fc1.", "3.": "fc2.", "5.": "fc3."}),
    "lenet": Spec("classification", 3, {"0.0.": "conv1.", "0.3.": "conv2.", "1.": "fc1.", "3.": "fc2.", "5.": "fc3."},
                  ("Conv2d", "Linear")),
    "convnet": Spec("classification", 3, {"0.0.": "conv1.", "0.1.": "bn1.", "0.4.": "conv2.", "0.5.": "bn2.",
                                          "1.": "fc1.", "3.": "fc2."}, ("Conv2d", "Linear")),
    "resnet18": Spec("classification", 3, blocks=("BasicBlock",)),
    "linear": Spec("regression", legacy={"1.": "linear."}),
    "gpt": Spec("language_modeling", blocks=("Block",)),
}
BUILTIN = BUILTIN_MODELS  # name -> _target_ (config.py), for configs from before _target_
assert BUILTIN.keys() == MODELS.keys()


def blocks(cfg: ModelConfig) -> tuple[str, ...]:
    """The classes of a model's blocks: dtrain's own models name theirs; a user's model has none (the root)."""
    spec = MODELS.get(cfg.name) if cfg.factory == BUILTIN.get(cfg.name) else None
    return spec.blocks if spec is not None else ()


def blocks_of(model: nn.Module, classes: Iterable[str], key: str = "dist.fsdp.shard") -> list[nn.Module]:
    """The submodules of `model` whose class `classes` names, innermost first (FSDP2 shards children before
    their parents). A name that matches no submodule is refused: a misspelt class would be ignored."""
    names = list(classes)
    found = [m for m in reversed(list(model.modules())) if m is not model and type(m).__name__ in names]
    missing = [n for n in names if n not in {type(m).__name__ for m in found}]
    if missing:
        present = sorted({type(m).__name__ for m in model.modules() if m is not model})
        raise ConfigError(f"{key}={names}: {type(model).__name__} has no submodule of class {missing[0]!r}; its "
                          f"classes are {', '.join(present) or 'none (it has no submodules)'}")
    return found


def offers(task: str, shape: tuple[int, ...], out: int) -> dict:
    """What dtrain offers a model factory, by keyword: the data's input shape, outputs, and classes."""
    from dtrain import tasks
    return {"input_shape": tuple(shape), "num_outputs": out, **tasks.get(task).offers(out)}


def build(cfg: ModelConfig, task: str, shape: tuple[int, ...], out: int, data_name: str) -> nn.Module:
    """The model `cfg` names (its `_target_` and keyword arguments) for data of `shape` with `out` outputs.
    The factory is also given `input_shape`, `num_outputs` and (classification) `num_classes` when it takes
    them by name. ConfigError if model and data cannot pair."""
    spec = MODELS.get(cfg.name) if cfg.factory == BUILTIN.get(cfg.name) else None
    if spec is not None:
        pairs = sorted(n for n, s in MODELS.items() if s.task == task)
        if spec.task != task:
            raise ConfigError(f"model={cfg.name} solves {spec.task} but data={data_name} is a {task} task; "
                              f"use one of model={', '.join(pairs)}")
        if spec.rank is not None and len(shape) != spec.rank:
            raise ConfigError(f"model={cfg.name} needs C x H x W images but data={data_name} gives shape "
                              f"{list(shape)}; use model=mlp or data with images")
    try:
        net = plugins.instantiate("model", plugins.Target(cfg.factory, cfg.kwargs), offers(task, shape, out))
    except RuntimeError as e:  # e.g. images too small for LeNet's two 5x5 convolutions
        if spec is None:
            raise
        raise ConfigError(f"model={cfg.name} cannot take data={data_name} of shape {list(shape)}: "
                          f"{str(e).splitlines()[0]}") from e
    if not isinstance(net, nn.Module):
        raise ConfigError(f"model: {cfg.factory} returned a {type(net).__name__}, not a torch.nn.Module")
    return net


def builtin(name: str, **options) -> ModelConfig:
    """The config of dtrain's own model `name` with `options` (dropout=..., ...), as conf/model/NAME.yaml gives it."""
    return ModelConfig(name=name, factory=BUILTIN[name], kwargs=options)


def from_object(made: object, task: str, shape: tuple[int, ...], out: int) -> nn.Module:
    """dtrain.fit's model: an nn.Module as it is, or a callable that returns one (given the keywords dtrain
    offers a model factory and it takes)."""
    if callable(made) and not isinstance(made, nn.Module):
        made = made(**plugins.accepted(made, offers(task, shape, out)))
    if not isinstance(made, nn.Module):
        raise ConfigError(f"model: got a {type(made).__name__}, not a torch.nn.Module (or a callable returning one)")
    return made


def upgrade(name: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state_dict with dtrain's earlier layer names (before the tutorial names) renamed; others unchanged."""
    legacy = MODELS[name].legacy if name in MODELS else None
    if not legacy or not any(k[:1].isdigit() for k in state):
        return dict(state)
    renamed = {}
    for key, value in state.items():
        old = next((o for o in legacy if key.startswith(o)), None)
        renamed[legacy[old] + key[len(old):] if old else key] = value
    return renamed


def load_weights(net: nn.Module, name: str, state: Mapping[str, torch.Tensor]) -> None:
    """`state` into `net` with strict=True (earlier dtrain layer names accepted); RuntimeError if it does not fit."""
    net.load_state_dict(upgrade(name, state), strict=True)


def read_weights(name: str, path: str) -> dict[str, torch.Tensor]:
    """The weights in `path` (checkpoint.read_weights), with dtrain's earlier layer names of model `name`
    renamed; a file that holds none is a ConfigError naming model.init_from."""
    from dtrain import checkpoint
    from dtrain.errors import CheckpointError
    try:
        return upgrade(name, checkpoint.read_weights(path))
    except CheckpointError as e:
        raise ConfigError(str(e)) from None


def init_from(net: nn.Module, name: str, path: str) -> None:
    """Start from the weights in `path` (see `read_weights`); ConfigError naming the keys that do not fit."""
    state = read_weights(name, path)
    try:
        load_weights(net, name, state)
    except RuntimeError as e:
        why = _mismatch(net.state_dict(), upgrade(name, state))
        raise ConfigError(f"model.init_from={path!r} does not fit model={name} ({why}); save the state_dict "
                          "of the same model and data shape") from e


def _mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str:
    """What differs between two state_dicts, in a few words: missing and unexpected keys, other shapes."""
    def few(keys) -> str:
        keys = sorted(keys)
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    shapes = [k for k in expected.keys() & given.keys() if expected[k].shape != given[k].shape]
    parts = [f"missing {few(expected.keys() - given.keys())}" if expected.keys() - given.keys() else "",
             f"unexpected {few(given.keys() - expected.keys())}" if given.keys() - expected.keys() else "",
             f"other shapes: {few(f'{k} {list(given[k].shape)} vs {list(expected[k].shape)}' for k in shapes)}"
             if shapes else ""]
    return "; ".join(p for p in parts if p)
