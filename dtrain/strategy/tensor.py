"""Tensor parallelism, applied inside FSDP2 on a 2-D mesh ("dp", "tp") when dist.tp > 1 (dist.strategy=fsdp).

A plan maps modules (globs over `named_modules()` names) to a style: `colwise` splits a Linear's output
features across the tp ranks (each keeps its slice of the outputs), `rowwise` splits its input features
(the partial outputs are summed, so the output is whole again). A model may carry its own plan
(`tp_plan(tp)`, as model=gpt does: attention's q/k/v column-wise and its output projection row-wise, the
MLP's fc column-wise and proj row-wise); `dist.tp_plan` gives one for any model. Widths that do not divide
by tp are refused, naming the layer, before the first step. Sequence parallelism (norms on a slice of the
sequence) needs the layers around them to hand over sequence-sharded activations: not built yet.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from dtrain.errors import ConfigError

STYLES = ("colwise", "rowwise")


def plan_of(model: nn.Module, entries: Iterable[Any] | None, tp: int) -> dict[str, str]:
    """Module name -> style: dist.tp_plan's entries ({module: GLOB, style: ...}, first match wins), else the
    model's own tp_plan(tp). A glob that matches no module, an unknown style, a model without a plan: one line."""
    if entries is None:
        if not callable(getattr(model, "tp_plan", None)):
            raise ConfigError(f"dist.tp={tp}: {type(model).__name__} has no tensor-parallel plan of its own; give "
                              "dist.tp_plan=[{module: GLOB, style: colwise|rowwise}, ...]")
        entries = [{"module": glob, "style": style} for glob, style in model.tp_plan(tp).items()]
    names = [name for name, _ in model.named_modules() if name]
    plan: dict[str, str] = {}
    for i, entry in enumerate(entries):
        glob, style = _entry(i, entry)
        matched = [n for n in names if fnmatch.fnmatchcase(n, glob)]
        if not matched:
            raise ConfigError(f"dist.tp_plan[{i}].module={glob!r} matches no module of {type(model).__name__}; its "
                              f"modules are named like {', '.join(names[:6])}{', ...' if len(names) > 6 else ''}")
        for name in matched:
            plan.setdefault(name, style)
    for name, style in plan.items():
        _check_width(name, model.get_submodule(name), style, tp)
    return plan


def _entry(i: int, entry: Any) -> tuple[str, str]:
    if not isinstance(entry, Mapping) or set(entry) != {"module", "style"}:
        raise ConfigError(f"dist.tp_plan[{i}]={entry!r} is not allowed: give {{module: GLOB, style: "
                          f"{'|'.join(STYLES)}}}")
    if entry["style"] not in STYLES:
        raise ConfigError(f"dist.tp_plan[{i}].style={entry['style']!r} is not allowed: choose one of "
                          f"{', '.join(STYLES)}")
    return str(entry["module"]), str(entry["style"])


def _check_width(name: str, module: nn.Module, style: str, tp: int) -> None:
    if not isinstance(module, nn.Linear):
        raise ConfigError(f"dist.tp_plan: {name} is a {type(module).__name__}; the {style} style splits an "
                          "nn.Linear")
    width, side = (module.out_features, "output") if style == "colwise" else (module.in_features, "input")
    if width % tp:
        raise ConfigError(f"dist.tp_plan: {name} has {width} {side} features, which do not divide by dist.tp={tp}; "
                          "choose a tp that divides them, or leave the layer out of the plan")


def apply(model: nn.Module, mesh: Any, plan: Mapping[str, str]) -> None:
    """Replace each planned module's parameters by DTensors sharded over `mesh` (the tp dimension)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    parallelize_module(model, mesh, {name: styles[style]() for name, style in plan.items()})


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the norm of every gradient together, when parameters live on different meshes (tensor-parallel
    layers on the 2-D mesh, the rest on the dp mesh), which PyTorch's clip_grad_norm_ cannot stack: a norm
    per mesh, each made whole, then combined."""
    params = [p for p in parameters if p.grad is not None]
    by_mesh: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        by_mesh.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
    norms = []
    for grads in by_mesh.values():
        norm = nn.utils.get_total_norm(grads)
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.tensor(0.0)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        local = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        local.mul_(coef.to(local.device, local.dtype))
    return total
