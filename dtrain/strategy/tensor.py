"""Tensor parallelism, applied inside FSDP2 on a 2-D mesh ("dp", "tp") when dist.tp > 1 (dist.strategy=fsdp).

A plan maps modules (globs over `named_modules()` names) to a style: `colwise` splits a Linear's output
features across the tp ranks (each keeps its slice of the outputs), `rowwise` splits its input features
(the partial outputs are summed, so the output is whole again), `sequence` (with dist.sequence_parallel)
runs a module, a norm or dropout, on this rank's slice of dimension 1, the sequence, and gathers its output
whole again. A model may carry its own plan, `tp_plan(tp, sequence_parallel=False, loss_parallel=False)`,
whose values are these names or PyTorch's own `ParallelStyle`s: model=gpt's splits attention's heads and the
MLP's width (Megatron's pairs), and with dist.sequence_parallel keeps the activations between the pairs split
along the sequence (reduce-scatter and all-gather in place of all-reduce), with dist.loss_parallel splits its
head over the vocabulary and computes the cross-entropy on the split logits. `dist.tp_plan` gives a plan
for any model. Widths that do not divide by tp, globs that match nothing: one line before any worker starts
(the launcher builds the model on the meta device to check), and again at each worker's start; a tie the
plan splits two ways: one line at start-up.
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from dtrain.errors import ConfigError, DataError

STYLES = ("colwise", "rowwise", "sequence")


def plan_of(model: nn.Module, entries: Iterable[Any] | None, tp: int, sequence_parallel: bool = False,
            loss_parallel: bool = False) -> dict[str, Any]:
    """Module name -> style (a name of STYLES or a ParallelStyle): dist.tp_plan's entries ({module: GLOB,
    style: ...}, first match wins), else the model's own tp_plan. A glob that matches no module, an unknown
    style, a model without a plan or without what dist.sequence_parallel / dist.loss_parallel ask: one line."""
    if entries is None:
        entries = [{"module": glob, "style": style}
                   for glob, style in own_plan(model, tp, sequence_parallel, loss_parallel).items()]
    else:
        if loss_parallel:
            raise ConfigError("dist.loss_parallel=true splits the model's output head, which only the model's own "
                              "tp_plan knows (model=gpt's); leave dist.tp_plan unset, or dist.loss_parallel=false")
        styles = {str(e.get("style")) for e in entries if isinstance(e, Mapping)}
        if sequence_parallel != ("sequence" in styles):
            raise ConfigError("dist.sequence_parallel=true needs dist.tp_plan entries of style sequence (the norms and "
                              "dropout run on slices of the sequence), and style sequence needs "
                              "dist.sequence_parallel=true: set both, or neither")
    names = [name for name, _ in model.named_modules() if name]
    plan: dict[str, Any] = {}
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


def own_plan(model: nn.Module, tp: int, sequence_parallel: bool, loss_parallel: bool) -> Mapping[str, Any]:
    plan = getattr(model, "tp_plan", None)
    if not callable(plan):
        raise ConfigError(f"dist.tp={tp}: {type(model).__name__} has no tensor-parallel plan of its own; give "
                          "dist.tp_plan=[{module: GLOB, style: colwise|rowwise|sequence}, ...]")
    asked = {k: True for k, v in (("sequence_parallel", sequence_parallel), ("loss_parallel", loss_parallel)) if v}
    missing = [k for k in asked if k not in inspect.signature(plan).parameters]
    if missing:
        raise ConfigError(f"dist.{missing[0]}=true but {type(model).__name__}.tp_plan takes no {missing[0]} argument: "
                          f"its plan cannot lay out the model for it; leave dist.{missing[0]}=false")
    return plan(tp, **asked)


def _entry(i: int, entry: Any) -> tuple[str, Any]:
    if not isinstance(entry, Mapping) or set(entry) != {"module", "style"}:
        raise ConfigError(f"dist.tp_plan[{i}]={entry!r} is not allowed: give {{module: GLOB, style: "
                          f"{'|'.join(STYLES)}}}")
    style = entry["style"]
    if not _is_torch_style(style) and style not in STYLES:
        raise ConfigError(f"dist.tp_plan[{i}].style={style!r} is not allowed: choose one of {', '.join(STYLES)}")
    return str(entry["module"]), style


def _is_torch_style(style: Any) -> bool:
    from torch.distributed.tensor.parallel import ParallelStyle
    return isinstance(style, ParallelStyle)


def _split(style: Any) -> str | None:
    """colwise or rowwise where a Linear's width is split and handed, split, to its pair (the width must then
    divide by tp: uneven slices do not line up); None where no such width is split."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    if style in ("colwise", "rowwise"):
        return style
    if isinstance(style, ColwiseParallel) and style.use_local_output and style.output_layouts == (Shard(-1),):
        return "colwise"
    if isinstance(style, RowwiseParallel) and style.input_layouts == (Shard(-1),):
        return "rowwise"
    return None


def _check_width(name: str, module: nn.Module, style: Any, tp: int) -> None:
    split = _split(style)
    if style == "sequence" or _is_torch_style(style) and split is None:
        return
    if not isinstance(module, nn.Linear):
        raise ConfigError(f"dist.tp_plan: {name} is a {type(module).__name__}; the {style} style splits an "
                          "nn.Linear")
    width, side = (module.out_features, "output") if split == "colwise" else (module.in_features, "input")
    if width % tp:
        raise ConfigError(f"dist.tp_plan: {name} has {width} {side} features, which do not divide by dist.tp={tp}; "
                          "choose a tp that divides them, or leave the layer out of the plan")


def apply(model: nn.Module, mesh: Any, plan: Mapping[str, Any]) -> None:
    """Replace each planned module's parameters by DTensors over `mesh` (the tp dimension). Parameters shared
    by several modules (a head tied to the embedding) stay shared, where the plan splits them alike."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel, "sequence": sequence_slice}
    ties = _ties(model)
    parallelize_module(model, mesh, {name: styles[s]() if isinstance(s, str) else s for name, s in plan.items()})
    for (first, attr), *others in ties:
        kept = getattr(model.get_submodule(first), attr)
        for name, other_attr in others:
            other = getattr(model.get_submodule(name), other_attr)
            if _layout(other) != _layout(kept):
                raise ConfigError(f"tensor-parallel plan: {first}.{attr} and {name}.{other_attr} are one (tied) "
                                  f"parameter, which the plan splits differently ({_layout(kept)} and "
                                  f"{_layout(other)}); plan both modules alike, or neither")
            setattr(model.get_submodule(name), other_attr, kept)


def _ties(model: nn.Module) -> list[list[tuple[str, str]]]:
    """Groups of (module name, attribute) that hold one parameter."""
    holders: dict[int, list[tuple[str, str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module.named_parameters(recurse=False):
            if (name, attr) not in holders.setdefault(id(p), []):
                holders[id(p)].append((name, attr))
    return [group for group in holders.values() if len(group) > 1]


def _layout(p: torch.Tensor) -> str:
    return str(tuple(p.placements)) if hasattr(p, "placements") else "whole"


def sequence_slice() -> Any:
    """Style `sequence` of a dist.tp_plan: the module (a norm, dropout) runs on this rank's slice of
    dimension 1 of its input, which every tp rank holds whole (cut, no communication); its output is gathered
    whole again. Its parameters are replicated DTensors (their gradients summed over the slices); a module
    without parameters (dropout) gets its plain slice, so it draws from the group's own random stream, not
    PyTorch's DTensor tracker (seeded alike on every rank of the world). Correct wherever it stands in a
    plan; it saves the module's activations and work, not communication. (Built here, not at import:
    PyTorch's tensor-parallel package takes half a second to import.)"""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
    from torch.distributed.tensor.parallel import ParallelStyle

    def partition(name, module, mesh):
        for key, p in list(module.named_parameters(recurse=False)):
            module.register_parameter(key, nn.Parameter(distribute_tensor(p, mesh, [Replicate()])))

    def slice_input(plain, module, inputs, mesh):
        sliced = (DTensor.from_local(t, mesh, [Replicate()], run_check=False).redistribute(mesh, [Shard(1)])
                  if isinstance(t, torch.Tensor) else t for t in inputs)
        return tuple(t.to_local() if plain and isinstance(t, DTensor) else t for t in sliced)

    def gather_output(module, out, mesh):
        if not isinstance(out, DTensor):
            out = DTensor.from_local(out, mesh, [Shard(1)], run_check=False)
        return out.redistribute(mesh, [Replicate()]).to_local()

    class SequenceSlice(ParallelStyle):
        def _apply(self, module: nn.Module, mesh: Any) -> nn.Module:
            plain = next(module.parameters(), None) is None  # known once, not looked up every forward
            return distribute_module(module, mesh, partition, functools.partial(slice_input, plain), gather_output)

    return SequenceSlice()


def check_sequence_length(model: nn.Module, tp: int) -> None:
    """Sequence parallelism splits dimension 1 of the model's input (the sequence) evenly over the tp ranks
    (uneven slices break gloo's collectives): a batch of another length is one line, on every rank of the
    group alike (they see the same batch)."""
    def check(module: nn.Module, args: tuple) -> None:
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is not None and (first.ndim < 2 or first.shape[1] % tp):
            raise DataError(f"dist.sequence_parallel=true splits dimension 1 of the input (the sequence) over "
                            f"dist.tp={tp} ranks, but a batch has shape {list(first.shape)}; give sequences whose "
                            f"length divides by {tp}, or dist.sequence_parallel=false")
    model.register_forward_pre_hook(check)


def whole(t: Any) -> Any:
    """A DTensor made a plain tensor (gathered, and differentiable): the loss computed on split logits
    (dist.loss_parallel), and the logits the metrics read; anything else as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def enable_loss_parallel() -> None:
    """PyTorch's loss parallelism (the cross-entropy of logits split over the vocabulary, without gathering
    them), for the rest of this process: its forward and backward must both run under it, and they run in
    different places of the loop. Only DTensor ops are affected, and the only DTensors the loss sees are the
    model's split logits."""
    from torch.distributed.tensor.parallel import loss_parallel
    loss_parallel().__enter__()


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
