"""Checkpoints as a contract (the `Checkpointer` in dtrain/checkpointer.py runs the protocol across ranks).

Layout in <run>/checkpoints/: `step-00000120.pt` files (checkpoint.format=file) or `step-00000120/`
folders (distributed checkpoints, dtrain/dcp.py), `latest` (the name of the newest complete one, moved only
after it is durable), and the best: a `best.pt` copy, or a `best` pointer to a folder. Writing goes to a
temporary name in the same folder, is fsynced, then renamed, so a reader never sees half a checkpoint.
Loading uses `torch.load(weights_only=True)`: a file that would run code on unpickling is refused.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from dtrain import dcp, files
from dtrain.config import flat
from dtrain.errors import CheckpointError, first_line, os_error
from dtrain.logs import log

FORMAT_VERSION = 3  # 3: Stateful parts by name (progress, ranks, ...); 2 (flat progress) is read and upgraded
_STEP = re.compile(r"step-(\d+)(\.pt)?")  # a file step-N.pt, or a distributed checkpoint's folder step-N


# -- RNG state of one process, in a form torch.load(weights_only=True) accepts ----------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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

_atomic_write = files.atomic_write  # a name of this module's own, which the fault tests replace


def step_files(folder: Path) -> list[Path]:
    """Checkpoints in `folder` (step-N.pt files, step-N folders), newest step first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := _STEP.fullmatch(p.name)) and p.is_dir() == (m.group(2) is None)]
    return [p for _, p in sorted(found, reverse=True)]


def write_failed(folder: Path, e: BaseException, needed: int = 0) -> CheckpointError:
    """The one line for a checkpoint the disk refused (full, read-only, gone), whatever layer raised it."""
    return CheckpointError(f"could not write a checkpoint in {folder}: {why_not_written(folder, e, needed)}; the "
                           "checkpoints already there are untouched. Free space or fix the folder's permissions, "
                           "then resume")


def why_not_written(folder: Path, e: BaseException, needed: int = 0) -> str:
    """Why a write of about `needed` bytes into `folder` failed. torch.distributed.checkpoint passes each
    rank's error on without its cause, so a full disk arrives as torch.save's 'unexpected pos' alone: then
    the free space, measured now (the failed write's part still there), says whether it was the disk."""
    why = first_line(e)
    free = files.free_bytes(folder)
    if os_error(e) is None and needed and free is not None and free < needed:
        return (f"No space left on device (about {needed / 2**20:.1f} MiB to write, {free / 2**20:.1f} MiB free; "
                f"{why})")
    return why


def _refused_by_disk(e: BaseException) -> bool:
    return os_error(e) is not None


def save(folder: Path, state: dict, step: int, keep_last: int, is_best: bool) -> Path:
    """Write `state` as step-<step>.pt, move `latest` to it, refresh best.pt, prune old files."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step-{step:08d}.pt"
        _atomic_write(path, lambda f: torch.save({**state, "format": FORMAT_VERSION}, f))
        _atomic_write(folder / "latest", lambda f: f.write(path.name.encode()))
        if is_best:
            _atomic_write(folder / "best.pt", lambda f: f.write(path.read_bytes()))
            (folder / "best").unlink(missing_ok=True)  # a distributed checkpoint's pointer, from another strategy
    except (OSError, RuntimeError) as e:  # torch.save reports a refused write as a RuntimeError
        if not _refused_by_disk(e):
            raise
        raise write_failed(folder, e) from e
    prune(folder, keep_last)
    return path


def publish(folder: Path, written: Path, state: dict, step: int, keep_last: int, is_best: bool) -> Path:
    """A distributed checkpoint whose shards every rank has written to the temporary folder `written`: add
    `state.pt`, make it all durable, rename it to step-<step>, then move `latest` (and `best`) to it."""
    path = folder / f"step-{step:08d}"
    try:
        _atomic_write(written / dcp.STATE, lambda f: torch.save({**state, "format": FORMAT_VERSION}, f))
        files.fsync_tree(written)
        if path.exists():  # the same step saved again (a resumed run): the new one replaces it
            dcp.remove(path)
        os.replace(written, path)
        files.fsync_dir(folder)
        _atomic_write(folder / "latest", lambda f: f.write(path.name.encode()))
        if is_best:  # a pointer: the folder it names is kept out of pruning
            _atomic_write(folder / "best", lambda f: f.write(path.name.encode()))
            (folder / "best.pt").unlink(missing_ok=True)  # a checkpoint file's copy, from another strategy
    except (OSError, RuntimeError) as e:
        if not _refused_by_disk(e):
            raise
        raise write_failed(folder, e) from e
    prune(folder, keep_last)
    return path


def prune(folder: Path, keep_last: int) -> None:
    """All but the newest `keep_last` checkpoints go (not the folder `best` names)."""
    best = _pointed(folder / "best")
    for old in step_files(folder)[keep_last:]:
        if old.is_dir():
            if old != best:
                dcp.remove(old)
        else:
            old.unlink(missing_ok=True)


def _pointed(pointer: Path) -> Optional[Path]:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return pointer.parent / pointer.read_text().strip()
    return None


def follow_latest(path: Path) -> Path:
    """`checkpoints/latest` (and a distributed checkpoint's `checkpoints/best`) name the checkpoint they point
    to; any other path is itself."""
    if path.name not in ("latest", "best") or not path.is_file():
        return path
    try:
        return path.parent / path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint pointer {path} is unreadable ({e}); use resume=auto") from e


# What every dtrain checkpoint holds, and the type of each entry: what it is (its step, model, config, world
# size) and its Stateful parts by name (dtrain/stateful.py).
_CONTENTS = {"format": int, "step": int, "model_name": str, "config": dict, "world_size": int,
             "model": dict, "optimizer": dict, "scheduler": dict, "scaler": dict, "progress": dict, "ranks": dict}
_TENSORS = {"model", "optimizer"}  # what a distributed checkpoint keeps in its shards, not in state.pt


def _upgrade(state: dict) -> dict:
    """A format 2 checkpoint as format 3: the progress and each rank's state as parts, the last epoch's
    metrics the logger's."""
    if state.get("format") != 2:
        return state
    state = dict(state)
    state["progress"] = {k: state.pop(k) for k in ("epoch", "samples_in_epoch")} | {"step": state["step"]}
    # each rank's sums were [loss sum, count, *extras]; now [loss sum, units, samples, *extras], a sample the unit
    ranks = [{**r, "epoch_sums": torch.cat([r["epoch_sums"][:2], r["epoch_sums"][1:]])} if "epoch_sums" in r else r
             for r in state["ranks"]]
    state["ranks"] = {"world_size": state["world_size"], "ranks": ranks}
    state["logger"] = {**(state.get("logger") or {}), "last_epoch": state.pop("metrics", None)}
    if "callbacks" not in state:  # checkpoints before callbacks held early stopping's state under its own key
        state["callbacks"] = {"early_stopping": state.pop("early_stopping", None) or {}}
    return {**state, "format": FORMAT_VERSION}


def load(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load and check one checkpoint: a file, or a distributed checkpoint's folder, whose small state is
    loaded (its model and optimizer stay on disk: `state["dcp"]` names the folder; `weights` reads the
    model). Anything that is not a readable dtrain checkpoint (missing, text, truncated, foreign,
    code-carrying, a folder of something else) becomes one CheckpointError saying what is wrong.
    `checkpoints/latest` is followed to the checkpoint it names."""
    path = follow_latest(Path(path))
    if path.is_dir():
        if not dcp.is_checkpoint(path):
            raise CheckpointError(f"checkpoint {path} is a folder but not a complete distributed checkpoint (no "
                                  f"{dcp.METADATA} and {dcp.STATE}); give a checkpoint (.../checkpoints/step-N.pt, "
                                  "step-N/ or best.pt), or resume=auto for a run folder's newest")
        state = _load_file(path / dcp.STATE, map_location, required=_CONTENTS.keys() - _TENSORS)
        damaged = dcp.damage(path)
        if damaged:
            raise CheckpointError(f"checkpoint {path} is corrupt: {damaged}")
        return {**state, "dcp": str(path)}
    return _load_file(path, map_location, required=_CONTENTS.keys())


def weights(state: dict) -> dict[str, torch.Tensor]:
    """A loaded checkpoint's model weights (a distributed checkpoint's, consolidated in this process)."""
    return dcp.full_model_state(Path(state["dcp"])) if "dcp" in state else state["model"]


def read_weights(path: str | Path, key: str = "model.init_from") -> dict[str, torch.Tensor]:
    """The model weights in `path`: a plain state_dict (`torch.save(model.state_dict(), PATH)`, the tutorial
    classes' included), a dtrain checkpoint file, or a distributed checkpoint folder (consolidated). A file
    that is none of these is a CheckpointError naming `key`."""
    where = follow_latest(Path(path).expanduser())  # a checkpoints/latest or best pointer: its target
    if dcp.is_checkpoint(where):
        return dcp.full_model_state(where)
    try:
        state = torch.load(where, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{key}={str(path)!r} does not exist; give the path of a saved state_dict") from None
    except Exception as e:
        raise CheckpointError(f"{key}={str(path)!r} is not a readable state_dict file ({type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0][:160]})") from e
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and "format" in state:
        state = state["model"]  # a dtrain checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{key}={str(path)!r} holds a {type(state).__name__}, not a state_dict of tensors")
    return state


def _load_file(path: Path, map_location, required) -> dict:
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path} does not exist") from e
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e) or "global" in str(e):  # the weights-only unpickler refused a class or function
            refused = CheckpointError(f"checkpoint {path} was refused: it holds objects other than tensors and "
                                      "plain values, which could run code when loaded; only load checkpoints "
                                      "written by dtrain or another source you trust")
            refused.unsafe = True  # whole, not corrupt: never set aside, never skipped for an older one
            raise refused from e
        raise _corrupt(path, e) from e
    except Exception as e:  # torch reports damage as RuntimeError, EOFError, KeyError, IndexError, ...
        raise _corrupt(path, e) from e
    if not isinstance(state, dict) or not isinstance(state.get("format"), int):
        raise CheckpointError(f"checkpoint {path} is not a dtrain checkpoint (no format version)")
    state = _upgrade(state)
    if state["format"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {state['format']}; this dtrain reads "
                              f"format {FORMAT_VERSION}")
    wrong = [k for k, kind in _CONTENTS.items() if k in required and not isinstance(state.get(k), kind)]
    if wrong:
        raise CheckpointError(f"checkpoint {path} is not a complete dtrain checkpoint (missing or malformed: "
                              f"{', '.join(wrong)})")
    return state


def _corrupt(path: Path, e: BaseException) -> CheckpointError:
    first = (str(e).splitlines() or [""])[0]
    return CheckpointError(f"checkpoint {path} is corrupt, truncated or not a checkpoint "
                           f"({type(e).__name__}: {first[:160]})")


def find_resumable(folder: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint in `folder` that loads; corrupt ones are skipped with a warning naming them."""
    candidates = step_files(folder)
    latest = folder / "latest"
    with contextlib.suppress(OSError, UnicodeDecodeError):  # an unreadable pointer: the step files decide
        named = folder / latest.read_text().strip()  # normally the first candidate already
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    for stale in folder.glob(".*.tmp*"):  # a write that was killed part-way; never renamed into place
        dcp.remove(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
    for path in candidates:
        try:
            return path, load(path)
        except CheckpointError as e:
            if getattr(e, "unsafe", False):
                raise
            # Set it aside (kept for inspection) so it neither shadows nor outlives good checkpoints.
            aside = path.with_name(path.name + ".corrupt")
            path.rename(aside)
            log.warning(f"warning: {e}; moved it to {aside.name} and trying an older checkpoint")
    set_aside = sorted(p.name for p in folder.glob("step-*.corrupt")) if folder.is_dir() else []
    if set_aside:  # checkpoints existed: starting from step 0 without a word would lose them
        raise CheckpointError(f"no checkpoint in {folder} can be loaded ({', '.join(set_aside)} set aside as "
                              "corrupt); resume=none starts over in this run folder, resume=PATH uses another "
                              "checkpoint")
    return None


# Keys that say how or where a run executes, not what it trains: they may differ on resume.
OPERATIONAL = ("resume", "name", "trainer.device", "trainer.log_every_n_steps", "trainer.stop_grace_s", "dist.",
               "launcher.",
               "logger.", "checkpoint.", "data.root", "data.path", "data.download", "data.verify_checksums",
               "data.num_workers", "data.eval_batch_size", "data.loader", "data.pin_memory",
               "data.persistent_workers", "data.prefetch_factor", "debug.",
               "optim.implementation")  # every implementation reaches the same weights (tests/test_training.py)


def config_changes(saved: dict, now: dict) -> dict[str, tuple[Any, Any]]:
    """The training values that differ between two configs (as config.as_dict gives them)."""
    def operational(key: str) -> bool:
        return any(key == o or o.endswith(".") and key.startswith(o) for o in OPERATIONAL)

    a, b = flat(saved), flat(now)
    return {k: (a[k], b[k]) for k in sorted(a.keys() & b.keys()) if a[k] != b[k] and not operational(k)}
