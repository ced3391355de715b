"""Checkpoints as a contract, and the `Checkpointer` that runs the protocol across ranks.

Layout in <run>/checkpoints/: `step-00000120.pt` files, `latest` (the name of the newest complete one,
moved only after that file is durable), `best.pt`. Writing goes to a temporary file in the same folder,
is fsynced, then renamed, so a reader never sees half a checkpoint. Loading uses
`torch.load(weights_only=True)`: a file that would run code on unpickling is refused.

The trainer only offers `state_dict()` / `load_state_dict()` (and the per-rank sums it keeps); the
Checkpointer decides when to save, gathers every rank's RNG and sums, writes on the main rank, makes
every rank fail together, picks the file to resume from, and re-shards per-rank state when the world
size changed.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch

from dtrain import signals
from dtrain import world as w
from dtrain.config import CheckpointConfig
from dtrain.errors import CheckpointError, Preempted
from dtrain.logs import log

FORMAT_VERSION = 2  # 2: per-rank sums are [loss, count, *task extras]; precision is fp32|bf16|fp16
_STEP_FILE = re.compile(r"step-(\d+)\.pt$")


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


def follow_latest(path: Path) -> Path:
    """`checkpoints/latest` names the newest checkpoint file; any other path is itself."""
    if path.name != "latest" or not path.is_file():
        return path
    try:
        return path.parent / path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint pointer {path} is unreadable ({e}); use resume=auto") from e


# What every dtrain checkpoint holds, and the type of each entry.
_CONTENTS = {"format": int, "model": dict, "optimizer": dict, "scheduler": dict, "scaler": dict, "epoch": int,
             "step": int, "samples_in_epoch": int, "model_name": str, "config": dict, "ranks": list,
             "world_size": int}


def load(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load and check one checkpoint file; any file that is not a readable dtrain checkpoint (missing,
    a folder, text, truncated, foreign, code-carrying) becomes one CheckpointError saying what is wrong.
    `checkpoints/latest` is followed to the file it names."""
    path = follow_latest(Path(path))
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; give a checkpoint file "
                              "(.../checkpoints/step-N.pt or best.pt), or resume=auto for a run folder's newest")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path} does not exist") from e
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e) or "global" in str(e):  # the weights-only unpickler refused a class or function
            raise CheckpointError(f"checkpoint {path} was refused: it holds objects other than tensors and "
                                  "plain values, which could run code when loaded; only load checkpoints "
                                  "written by dtrain or another source you trust") from e
        raise _corrupt(path, e) from e
    except Exception as e:  # torch reports damage as RuntimeError, EOFError, KeyError, IndexError, ...
        raise _corrupt(path, e) from e
    if not isinstance(state, dict) or not isinstance(state.get("format"), int):
        raise CheckpointError(f"checkpoint {path} is not a dtrain checkpoint (no format version)")
    if state["format"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {state['format']}; this dtrain reads "
                              f"format {FORMAT_VERSION}")
    wrong = [k for k, kind in _CONTENTS.items() if not isinstance(state.get(k), kind)]
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


# -- the protocol across ranks ----------------------------------------------------------------------

class Checkpointable(Protocol):
    def state_dict(self) -> dict: ...  # the same on every rank: model, optimizer, progress, ...
    def rank_state(self) -> dict[str, torch.Tensor]: ...  # this rank's own additive sums
    def load_state_dict(self, state: dict) -> None: ...  # state["rank"] holds this rank's sums


class Checkpointer:
    """When to save, how every rank takes part, and what to resume from, for one run folder."""

    def __init__(self, folder: Path, cfg: CheckpointConfig, world: w.World, enabled: bool, monitor: str,
                 higher_is_better: bool, seed: int, config: dict, record_change: Callable[[str], None]):
        self.folder, self.cfg, self.world, self.enabled = folder, cfg, world, enabled and cfg.enabled
        self.monitor, self.higher_is_better, self.seed = monitor, higher_is_better, seed
        self.config, self.record_change = config, record_change  # this run's config; where changes are noted
        self.best: Optional[float] = None  # the monitored value of best.pt

    def should_save(self, step: int, epoch: int, *, epoch_end: bool, last: bool = False) -> bool:
        """At the end of training, every `every_n_epochs` epochs, every `every_n_steps` steps. At an epoch's
        end both cadences count, so a step that ends an epoch is saved once, with its validation."""
        by_step = bool(self.cfg.every_n_steps) and step % self.cfg.every_n_steps == 0
        by_epoch = epoch_end and bool(self.cfg.every_n_epochs) and epoch % self.cfg.every_n_epochs == 0
        return self.enabled and (last or by_step or by_epoch)

    def save(self, trainer: Checkpointable, step: int, val: Optional[dict] = None) -> None:
        """All ranks call this: gather every rank's RNG and sums, let the main rank write, fail together.
        `val` (the epoch's validation metrics, or None mid-epoch) decides whether this becomes best.pt."""
        ranks = w.gather_objects({"rng": rng_state(), **{k: v.cpu() for k, v in trainer.rank_state().items()}})
        is_best = False
        if val is not None:
            value = val[self.monitor.removeprefix("val_")]
            is_best = self.best is None or (value > self.best if self.higher_is_better else value < self.best)
            self.best = value if is_best else self.best
        error = None
        if self.world.is_main:
            try:
                state = {**trainer.state_dict(), "best": self.best, "ranks": ranks,
                         "world_size": self.world.world_size}
                path = save(self.folder, state, step, self.cfg.keep_last, is_best)
                log.info(f"checkpoint: {path}" + (" (best)" if is_best else ""))
            except CheckpointError as e:
                error = str(e)
        error = w.broadcast_object(error)
        if error:
            raise CheckpointError(error)

    def save_on_stop(self, trainer: Checkpointable, step: int, stop: Preempted) -> None:
        """Every rank got here after the same step of a stop signal: checkpoint it (if checkpointing is on)
        and say, once, how to go on."""
        why = f"stopped by {signals.name(stop.signum)} after step {step}"
        if not self.enabled:
            stop.code = 128 + stop.signum  # nothing saved, so no "requeue me"
            log.info(f"{why}; checkpointing is off (checkpoint.enabled=false or a debug mode), so nothing "
                     "was saved and a rerun starts over")
            return
        self.save(trainer, step)
        log.info(f"{why}: checkpoint saved; exiting with {stop.code}. To continue, run the same command with "
                 f"resume=last (the newest run of this config) or hydra.run.dir={self.folder.parent}")

    def resume(self, trainer: Checkpointable, resume: str) -> Optional[dict]:
        """Load `resume` (auto: the newest good checkpoint here, if any; none; a path) into `trainer`
        on every rank. Returns the checkpoint's state, or None when starting fresh."""
        if resume == "none" or resume in ("auto", "last") and not self.enabled:
            return None
        if resume in ("auto", "last"):  # for last, the run folder already is the newest run's (rundir.folder_id)
            # The main rank picks the newest good file, so all ranks load the same one.
            found = find_resumable(self.folder) if self.world.is_main else None
            path = w.broadcast_object(str(found[0]) if found else None)
            if path is None:
                return None
        else:
            path = str(follow_latest(Path(resume)))
        state = load(Path(path), map_location=self.world.device)
        if state["model_name"] != self.config["model"]["name"]:
            raise CheckpointError(f"checkpoint {path} holds model={state['model_name']} but the config asks for "
                                  f"model={self.config['model']['name']}; pass the matching model= or "
                                  "resume=none to start fresh")
        try:
            state["rank"] = self._this_ranks_share(state)
            trainer.load_state_dict(state)
        except Exception as e:  # a file that loads but does not fit: the clear error, never a traceback
            raise CheckpointError(f"checkpoint {path} {(str(e).splitlines() or [''])[0]}") from e
        self._check_config(state["config"], path)
        self.best = state.get("best")
        where = f"in epoch {state['epoch'] + 1}" if state["samples_in_epoch"] else f"after epoch {state['epoch']}"
        log.info(f"resumed from {path}: step {state['step']}, {where}")
        return state

    def _check_config(self, saved: dict, path: str) -> None:
        """Resuming with other training values would mix two runs under one record: refuse, naming the
        keys, unless checkpoint.allow_config_change=true, which notes what changed and when."""
        changes = config_changes(saved, self.config)
        if not changes:
            return
        listed = ", ".join(f"{k}={a!r} -> {b!r}" for k, (a, b) in changes.items())
        if not self.cfg.allow_config_change:
            refused = CheckpointError(f"checkpoint {path} was trained with other values: {listed}; rerun with the "
                                      "original values, resume=none to start fresh, or checkpoint."
                                      "allow_config_change=true to continue with the new ones (noted in "
                                      "config-changes.jsonl)")
            refused.same_on_every_rank = True  # every rank compares the same two configs: say it once
            raise refused
        log.info(f"resuming {path} with changed values: {listed} (noted in config-changes.jsonl)")
        self.record_change(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "checkpoint": str(path),
                                       "changes": {k: list(v) for k, v in changes.items()}}) + "\n")

    def _this_ranks_share(self, state: dict) -> dict:
        """The same world size continues each rank's RNG and sums exactly. Another world size cannot:
        random streams restart from the seed (a warning says so) and the sums, being additive, go to
        the main rank. The data position itself re-shards on any world size (data.TrainSampler)."""
        ranks = state["ranks"]
        if state["world_size"] == self.world.world_size:
            share = dict(ranks[self.world.rank])
            set_rng_state(share.pop("rng"))
            return share
        log.warning(f"resuming {state['world_size']} ranks' checkpoint on {self.world.world_size} "
                    "ranks: data continues from the saved position, random streams are re-seeded")
        seed_everything(self.seed + self.world.rank + state["step"])
        keys = [k for k in ranks[0] if k != "rng"]
        return {k: sum(r[k] for r in ranks) * (1 if self.world.is_main else 0) for k in keys}


# Keys that say how or where a run executes, not what it trains: they may differ on resume.
OPERATIONAL = ("resume", "name", "trainer.device", "trainer.log_every_n_steps", "trainer.stop_grace_s", "dist.",
               "launcher.",
               "logger.", "checkpoint.", "data.root", "data.path", "data.download", "data.verify_checksums",
               "data.num_workers", "data.eval_batch_size", "data.loader", "data.pin_memory",
               "data.persistent_workers", "data.prefetch_factor", "debug.")


def config_changes(saved: dict, now: dict) -> dict[str, tuple[Any, Any]]:
    """The training values that differ between two configs (as config.as_dict gives them)."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    def operational(key: str) -> bool:
        return any(key == o or o.endswith(".") and key.startswith(o) for o in OPERATIONAL)

    a, b = flat(saved), flat(now)
    return {k: (a[k], b[k]) for k in sorted(a.keys() & b.keys()) if a[k] != b[k] and not operational(k)}
