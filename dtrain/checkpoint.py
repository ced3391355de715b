"""Checkpoints as a contract.

Layout in <run>/checkpoints/: `step-00000120.pt` files, `latest` (the name of the newest complete one,
moved only after that file is durable), `best.pt`. Writing goes to a temporary file in the same folder,
is fsynced, then renamed, so a reader never sees half a checkpoint. Loading uses
`torch.load(weights_only=True)`: a file that would run code on unpickling is refused.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtrain.logs import log

FORMAT_VERSION = 1
_STEP_FILE = re.compile(r"step-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used; the message names the file and what to do."""


# -- RNG state of one process, in a form torch.load(weights_only=True) accepts ----------------------

def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -- files ------------------------------------------------------------------------------------------

def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def step_files(folder: Path) -> list[Path]:
    """Checkpoint files in `folder`, newest step first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_FILE.search(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def save(folder: Path, state: dict, step: int, keep_last: int, is_best: bool) -> Path:
    """Write `state` as step-<step>.pt, move `latest` to it, refresh best.pt, prune old files."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step-{step:08d}.pt"
        _atomic_write(path, lambda f: torch.save({**state, "format": FORMAT_VERSION}, f))
        _atomic_write(folder / "latest", lambda f: f.write(path.name.encode()))
        if is_best:
            _atomic_write(folder / "best.pt", lambda f: f.write(path.read_bytes()))
    except OSError as e:
        raise CheckpointError(f"could not write a checkpoint in {folder}: {e.strerror or e}; the "
                              "checkpoints already there are untouched. Free space or fix the folder's "
                              "permissions, then resume") from e
    for old in step_files(folder)[keep_last:]:
        old.unlink(missing_ok=True)
    return path


def load(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load and check one checkpoint file; CheckpointError says what is wrong with it."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path} does not exist") from e
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"checkpoint {path} was refused: it holds objects other than tensors and "
                              "plain values, which could run code when loaded; only load checkpoints "
                              "written by dtrain or another source you trust") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(state, dict) or "format" not in state or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not a dtrain checkpoint (no format version)")
    if state["format"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {state['format']}; this dtrain reads "
                              f"format {FORMAT_VERSION}")
    return state


def find_resumable(folder: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint in `folder` that loads; corrupt ones are skipped with a warning naming them."""
    candidates = step_files(folder)
    latest = folder / "latest"
    if latest.is_file():  # normally the first candidate already; trust it first if it says otherwise
        named = folder / latest.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    for stale in folder.glob(".*.tmp-*"):  # a write that was killed part-way; never renamed into place
        stale.unlink(missing_ok=True)
    for path in candidates:
        try:
            return path, load(path)
        except CheckpointError as e:
            # Set it aside (kept for inspection) so it neither shadows nor outlives good checkpoints.
            aside = path.with_name(path.name + ".corrupt")
            path.rename(aside)
            log.warning(f"warning: {e}; moved it to {aside.name} and trying an older checkpoint")
    return None
