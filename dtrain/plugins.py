"""The user's own code, named by Hydra's `_target_` convention: `{_target_: package.module.Name, **kwargs}`.

`resolve` imports what a dotted path names, `check` binds the config's keyword arguments to its signature,
and `instantiate` builds it with `hydra.utils.instantiate` (nested `_target_`s included), adding the
keywords dtrain offers (`input_shape`, `num_outputs`, ... for a model) when the callable takes them by
name. Resolving and checking import modules but build nothing, so validation runs them before any worker
starts. Every error is one ConfigError naming the key, what was found and what is expected; an exception
raised inside the user's own code is theirs, and keeps its traceback.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from dtrain.errors import ConfigError


@dataclass
class Target:
    """A `_target_` and the keyword arguments the config gives it."""
    path: str
    kwargs: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"_target_": self.path, **self.kwargs}


def from_node(key: str, node: Any) -> Target:
    """A config entry `{_target_: ..., **kwargs}` as a Target."""
    if not isinstance(node, Mapping) or not isinstance(node.get("_target_"), str) or not node["_target_"]:
        raise ConfigError(f"{key}: expected {{_target_: package.module.Name, ...its keyword arguments}}, found "
                          f"{dict(node) if isinstance(node, Mapping) else node!r}")
    kwargs = {k: v for k, v in node.items() if k != "_target_"}
    return Target(node["_target_"], kwargs)


def resolve(key: str, path: str) -> Callable:
    """What the dotted `path` names (a class, a function, or an attribute of either)."""
    parts = path.split(".")
    module, error = None, None
    for i in range(len(parts) - 1, 0, -1):  # the longest importable module prefix
        try:
            module = importlib.import_module(".".join(parts[:i]))
            break
        except ModuleNotFoundError as e:
            error = e
            if e.name is not None and not ".".join(parts[:i]).startswith(e.name):
                raise ConfigError(f"{key}._target_={path}: importing {'.'.join(parts[:i])} failed: {e}; install the "
                                  "package it needs") from None
    if module is None:
        raise ConfigError(f"{key}._target_={path}: cannot import {parts[0]!r} ({error}); install the package that "
                          "defines it, or put its folder on PYTHONPATH") from None
    obj: Any = module
    for j, attr in enumerate(parts[i:], start=i):
        if not hasattr(obj, attr):
            if inspect.ismodule(obj) and j < len(parts) - 1:  # a package path, not a name in a module
                raise ConfigError(f"{key}._target_={path}: no module named {'.'.join(parts[:j + 1])!r} "
                                  f"({'.'.join(parts[:j])} has no module or attribute {attr!r})")
            raise ConfigError(f"{key}._target_={path}: {'.'.join(parts[:j])} has no attribute {attr!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ConfigError(f"{key}._target_={path} is a {type(obj).__name__}, not a class or function that can be "
                          "called")
    return obj


def _parameters(fn: Callable) -> dict[str, inspect.Parameter] | None:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # some builtins have no signature: nothing to check
        return None


def accepted(fn: Callable, offers: Mapping[str, Any]) -> dict[str, Any]:
    """The keywords dtrain offers that `fn` takes by name."""
    params = _parameters(fn) or {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {k: v for k, v in offers.items() if k in params and params[k].kind in kinds}


def check(key: str, path: str, kwargs: Mapping[str, Any], offers: Iterable[str] = (), positional: int = 0) -> Callable:
    """Resolve `path` and bind the config's `kwargs` (with the offered keywords, and `positional` arguments
    dtrain passes itself, such as a loss function's output and target) to its signature."""
    fn = resolve(key, path)
    params = _parameters(fn)
    if params is None:
        return fn
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = [n for n, p in params.items() if p.kind in kinds]
    if not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in kwargs if k not in named]
        if unknown:
            takes = ", ".join(named) or "no keyword arguments"
            raise ConfigError(f"{key}: {path} takes no argument {unknown[0]!r} (it takes {takes})")
    offered = set(offers)
    positional_names = [n for n, p in params.items() if p.kind != inspect.Parameter.KEYWORD_ONLY][:positional]
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and p.kind in kinds
               and n not in kwargs and n not in offered and n not in positional_names]
    if missing:
        raise ConfigError(f"{key}: {path} needs {missing[0]}=...; give it in the config")
    return fn


def instantiate(key: str, target: Target, offers: Mapping[str, Any] | None = None) -> Any:
    """Build `target` (check first) with the offered keywords it takes."""
    fn = check(key, target.path, target.kwargs, offers or {})
    extra = accepted(fn, offers or {})
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate
    try:  # Hydra builds the config's arguments (nested _target_s too); dtrain's objects are passed as they are
        bound = hydra_instantiate(target.as_dict(), _partial_=True, _convert_="all")
    except InstantiationException as e:
        if e.__cause__ is not None:  # raised inside the user's code: theirs, with their traceback
            raise e.__cause__ from None
        raise ConfigError(f"{key}._target_={target.path}: {str(e).splitlines()[0]}") from None
    return bound(**extra)


def check_callable(key: str, target: Target, positional: int) -> Callable:
    """A loss or metric's target: a class takes the config's arguments in its constructor; a function takes
    them after the `positional` (output, target) ones."""
    fn = resolve(key, target.path)
    return check(key, target.path, target.kwargs, positional=0 if inspect.isclass(fn) else positional)


def function_or_instance(key: str, target: Target, positional: int) -> Callable:
    """A loss or metric: a class is built (an nn.Module loss, a torchmetrics Metric); a function taking
    (output, target) is used as it is, with the config's keyword arguments bound."""
    fn = resolve(key, target.path)
    if inspect.isclass(fn):
        return instantiate(key, target)
    check(key, target.path, target.kwargs, positional=positional)
    return functools.partial(fn, **target.kwargs) if target.kwargs else fn


def path_of(obj: Any) -> str:
    """The dotted path of an object's class (of a function, the function), as a `_target_` names it."""
    kind = obj if inspect.isclass(obj) or inspect.isfunction(obj) else type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


def importable(obj: Any) -> str | None:
    """The dotted path that imports `obj` back, for a class or function defined at a module's top level;
    None for anything else (an instance, a lambda, a script's own class or function)."""
    if not (inspect.isclass(obj) or inspect.isfunction(obj)) or obj.__module__ in (None, "__main__") \
            or "<" in obj.__qualname__:
        return None
    path = f"{obj.__module__}.{obj.__qualname__}"
    try:
        return path if resolve("", path) is obj else None
    except ConfigError:
        return None


def called(made: Any, offers: Mapping[str, Any]) -> Any:
    """A factory dtrain.fit was given (a function or class), called with what dtrain offers and it takes; a
    Dataset or module as it is."""
    import torch
    if callable(made) and not isinstance(made, (torch.nn.Module, torch.utils.data.Dataset)):
        return made(**accepted(made, offers))
    return made


def short_name(path: str) -> str:
    """The last part of a dotted path: what a run is named after when its config gives no `name`."""
    return path.rsplit(".", 1)[-1]
