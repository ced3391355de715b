"""Distributed checkpoints (`checkpoint.format=dcp`): a folder `checkpoints/step-<N>/` that every rank writes
its own shards into with `torch.distributed.checkpoint`, beside the small state the main rank writes.

    step-00000120/
      .metadata, __<rank>_0.distcp    the model and optimizer, sharded as they were trained (DCP's files)
      state.pt                        everything else: progress, scheduler, scaler, callbacks, every rank's
                                      RNG and sums, the config (dtrain's file format, weights only)

The folder is written under a temporary name and renamed once every rank's shards and `state.pt` are
durable, so a folder named `step-<N>` is complete. Loading reshards: the saved tensors are read into
whatever layout the model and optimizer have now (another world size, DDP or FSDP), and a model can be
consolidated into one full state dict in a single process (inference, export).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from dtrain import optim
from dtrain import world as w

STATE = "state.pt"
METADATA = ".metadata"


def refused_by_disk(e: BaseException) -> bool:
    """Whether a save failed as a full disk or a read-only folder fails it: an OSError, or torch's
    CheckpointException holding each rank's error (a BaseException, which `except Exception` misses;
    checked by its module, which is loaded once DCP is used: importing it takes a second)."""
    api = sys.modules.get("torch.distributed.checkpoint.api")
    return isinstance(e, OSError) or (api is not None and isinstance(e, api.CheckpointException))


def failures() -> tuple[type[BaseException], ...]:
    """What a save can fail with: any Exception, and torch's CheckpointException (a BaseException)."""
    from torch.distributed.checkpoint.api import CheckpointException
    return Exception, CheckpointException


@contextlib.contextmanager
def _one_process_is_fine():
    """DCP warns that it assumes one process when no process group exists: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", message="torch.distributed is unavailable")
        yield


def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / METADATA).is_file() and (path / STATE).is_file()


def damage(path: Path) -> Optional[str]:
    """What makes a distributed checkpoint's folder unreadable, or None: `.metadata` must load, and every
    shard file it names must exist and hold the bytes it says (a truncated or missing rank's file is found
    here, before any rank starts loading it)."""
    from torch.distributed.checkpoint import FileSystemReader
    try:
        with _one_process_is_fine():
            metadata = FileSystemReader(str(path)).read_metadata()
        needed: dict[str, int] = {}
        for info in metadata.storage_data.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    except Exception as e:  # a truncated or foreign .metadata fails in many ways
        return f"its {METADATA} is unreadable ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})"
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            return f"its shard file {name} is missing"
        if file.stat().st_size < size:
            return f"its shard file {name} is truncated ({file.stat().st_size} of {size} bytes)"
    return None


def temporary(path: Path) -> Path:
    """Where `path` is written before it counts (the same name on every rank)."""
    return path.with_name(f".{path.name}.tmp")


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The model's and optimizer's state as DCP saves and loads it: each rank's shards (FSDP) or the
    replicated tensors (one process, DDP), keyed by parameter names."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd}


def local_bytes(state: Any) -> int:
    """Bytes of this rank's part of the tensors in a (nested) state dict: what it writes of a checkpoint."""
    if isinstance(state, dict):
        return sum(local_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(local_bytes(v) for v in state)
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    return 0


def rank_0_buffers(model: nn.Module, model_sd: dict[str, Any]) -> dict[str, Any]:
    """`model_sd` with copies of rank 0's buffers in place of this rank's. After a forward the ranks'
    buffers differ (each updates batch norm's statistics with its own batch; DDP hands out rank 0's at the
    next forward's start), and DCP writes a replicated tensor from whichever rank its plan picks: the
    checkpoint holds rank 0's, as a checkpoint file does. Copies, also because the next forward changes
    the buffers in place while an asynchronous save's copy runs beside it (which only holds back the
    optimizer's update of the parameters). Every rank calls it, at the same point."""
    live = {b.data_ptr() for b in model.buffers() if b.numel()}
    buffers = {k: v.clone() for k, v in model_sd.items()
               if type(v) is torch.Tensor and v.numel() and v.data_ptr() in live}
    w.broadcast_tensors(list(buffers.values()))
    return {**model_sd, **buffers}


def write(folder: Path, tensors: dict[str, Any], process_group=None, stager=None):
    """Every rank writes its shards of `tensors` into `folder`. With a `stager` (asynchronous; coordinated in
    `process_group`, off the training group) it returns at once two futures: the tensors copied (the
    training must not change them before) and written (the folder may count after); else None once written."""
    import torch.distributed.checkpoint as dcp
    with _one_process_is_fine():
        if stager is not None:
            response = dcp.async_save(tensors, checkpoint_id=str(folder), process_group=process_group,
                                      async_stager=stager)
            return response.staging_completion, response.upload_completion
        dcp.save(tensors, checkpoint_id=str(folder))
    return None


def stager():
    """What copies the tensors of an asynchronous save, itself in the background (into plain memory on the
    CPU), so the loop goes on while the copy is made."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    return DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False, use_async_staging=True,
                                        use_non_blocking_copy=False))


def read_into(path: Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> None:
    """Load a checkpoint's model (and optimizer) into their current layout, whatever layout saved them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_model_state_dict, set_state_dict
    if optimizer is None:
        state = {"model": model.state_dict()}
        with _one_process_is_fine():
            dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(model, state["model"])
        return
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    with _one_process_is_fine():
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=optim.own_implementation(optimizer, state["optimizer"]))


def full_model_state(path: Path) -> dict[str, torch.Tensor]:
    """The model's full state dict, consolidated from every shard in this one process (no process group)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
    metadata = FileSystemReader(str(path)).read_metadata()
    keys = {k for k in metadata.state_dict_metadata if k.startswith("model.")}
    with _one_process_is_fine(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # a private loader: the one that needs no template
        loaded = _load_state_dict_from_keys(keys=keys, checkpoint_id=str(path))
    return {k.removeprefix("model."): v for k, v in _flatten(loaded).items()}


def _flatten(nested: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in nested.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
