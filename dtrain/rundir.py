"""The run folder: the one object that knows which files a run writes there, who owns the folder, and
what may be removed after bad input.

    config.yaml           the resolved config, written once by the run that started the folder
    config-changes.jsonl  what a resume with checkpoint.allow_config_change=true changed, and when
    .hydra/               Hydra's record of that first run: its config, its own settings, the overrides
    rank{N}.log           each rank's own log, every line naming the rank (appended by every run in the folder)
    metrics.jsonl         one JSON object per epoch (sinks.JsonlSink)
    summary.json          final metrics and timings
    confusion.json        the final validation confusion matrix (classification)
    samples.npz           a few validation images with their true and predicted labels (image classification)
    curves.png, confusion.png, samples.png   plots drawn from the three files above (dtrain.plots)
    tensorboard/, wandb/  the optional sinks' own files (logger.tensorboard, logger.wandb)
    profile/              torch.profiler traces, one per rank (trainer.profile=true)
    checkpoints/          step-*.pt or step-*/, latest, best.pt or best (checkpointer.Checkpointer)
    .lock                 held by the main process for the run's lifetime: host, pid, start time

Only the main process writes files, except each rank's own log and profiler trace. dtrain removes only what
this invocation created, and only while the folder holds no result: Hydra makes the folder (and its
parents) before dtrain runs, so a Hydra callback (`RecordExisting`, named in conf/config.yaml) notes which
folders existed before.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import math
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from dtrain import files
from dtrain import world as w
from dtrain.errors import EXIT_BAD_INPUT, BadInput, ContractError, WorldError

# The names of the records a run leaves, which the plots and inference read back by these names too
METRICS, SUMMARY, CONFUSION, SAMPLES = "metrics.jsonl", "summary.json", "confusion.json", "samples.npz"

# The deepest folder on the way to the run folder that existed before Hydra made it (see RecordExisting).
_existed: dict[str, Path] = {}


class RunFolderError(BadInput):
    """The run folder cannot be used: held by another live job, or the disk refused a write."""
    same_on_every_rank = True


def _deepest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


_runs_in_this_process = 1  # dtrain.fit and dtrain.api.train count their runs: each is a run of its own


def folder_id(base: str = "", *, _root_: DictConfig) -> str:
    """The last part of the run folder (runs/<name>/<id>): a new id every launch agrees on
    (world.shared_run_id; the second run of one process adds -2, and so on, which every rank of it
    counts alike), or with resume=last the newest run under `base` that has a checkpoint."""
    return _folder_id(base, _root_.get("resume") == "last", _runs_in_this_process)


def next_run() -> None:
    """A further run in this process (a second dtrain.fit): its folder id is a new one."""
    global _runs_in_this_process
    _runs_in_this_process += 1


@functools.lru_cache(maxsize=None)  # the same answer every time Hydra resolves it for one run
def _folder_id(base: str, last: bool, run: int) -> str:
    if last and base:
        runs = list(Path(base).glob("*/checkpoints/latest"))
        if runs:
            return max(runs, key=lambda p: p.stat().st_mtime).parent.parent.name
    return w.shared_run_id() + (f"-{run}" if run > 1 else "")


def sweep_id() -> str:
    """The sweep folder's id (runs/multirun/<id>), fixed by the process that starts the sweep and inherited
    by its jobs: Hydra's submitit launcher resolves the folder again inside each SLURM job."""
    return os.environ.setdefault("DTRAIN_SWEEP_ID", w.shared_run_id())


def check_creatable(path: Path, key: str = "hydra.run.dir") -> None:
    """A run folder that cannot be made is a RunFolderError naming why, raised before anything is made:
    a file where a folder must be, or a folder name longer than the file system allows."""
    path = path.absolute()
    existing = _deepest_existing(path)
    if not existing.is_dir():
        raise RunFolderError(f"{key}={path}: {existing} is a file, not a folder; choose another run folder")
    if path != existing and (link := existing / path.relative_to(existing).parts[0]).is_symlink():
        raise RunFolderError(f"{key}={path}: {link} is a symbolic link to {os.readlink(link)}, which does not exist; "
                             "create its target or choose another run folder")
    limit = os.pathconf(existing, "PC_NAME_MAX")
    for part in path.relative_to(existing).parts:
        if len(part.encode()) > limit:
            raise RunFolderError(f"{key}: the folder name {part[:24]}... is {len(part.encode())} bytes long, more "
                                 f"than this file system allows ({limit}); choose a shorter name= or {key}=")


class RecordExisting(Callback):
    """Hydra callback: before Hydra makes the run (or sweep) folder, check it can be made (else one line
    and exit 2, as for any bad input) and remember what already existed."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _existed["run"] = _checked(Path(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _existed["run"] = _checked(Path(config.hydra.sweep.dir), "hydra.sweep.dir")


def _checked(path: Path, key: str) -> Path:
    try:
        check_creatable(path, key)
    except RunFolderError as e:  # Hydra would print its traceback for an exception raised here
        print(f"dtrain: error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)
    return _existed_before_this_launch(path)


def _existed_before_this_launch(path: Path) -> Path:
    """The deepest folder on the way to `path` that existed before any process of this launch made it. Each
    process of a launch (torchrun's ranks) decides alone, with no process group yet, and a slow one may look
    after a fast one's Hydra made the folder: so the first process of the launch on this node records its
    answer (a file under the temp folder named by the launch's run id and the path; a hard link makes the
    first one win) before its Hydra makes anything, and every other process takes that answer."""
    mine = _deepest_existing(path)
    key = hashlib.sha256(f"{w.shared_run_id()}\0{path.absolute()}".encode()).hexdigest()[:20]
    folder = Path(tempfile.gettempdir()) / f"dtrain-{os.getuid()}"
    try:
        folder.mkdir(exist_ok=True)
        for old in folder.glob("existed-*"):  # records of launches long over
            if time.time() - old.stat().st_mtime > 86400:
                old.unlink(missing_ok=True)
        record, tmp = folder / f"existed-{key}", folder / f".existed-{key}.{os.getpid()}"
        tmp.write_text(str(mine))
        try:
            os.link(tmp, record)
        except FileExistsError:
            pass  # another process of this launch was first: its answer stands
        finally:
            tmp.unlink(missing_ok=True)
        return Path(record.read_text())
    except OSError:  # no writable temp folder: this process's own view
        return mine


def note_existing(path: Path) -> None:
    """Before a run folder is made outside Hydra (dtrain.fit): what existed, as RecordExisting notes it."""
    _existed["run"] = _deepest_existing(path)


def as_json(record: dict, what: str, indent: Optional[int] = None) -> str:
    """`record` as strict JSON: a NaN or infinity becomes null (JSON has neither). A value JSON cannot hold
    (a tensor a callback added) is one line naming its key."""
    def plain(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

    record = plain(record)
    for key, value in record.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise ContractError(f"{what}[{key!r}] is a {type(value).__name__}, which JSON cannot hold; a callback "
                                "adding it must add numbers, strings, lists or dicts (a tensor: .item() or "
                                ".tolist())") from None
    return json.dumps(record, indent=indent, allow_nan=False)


class RunDir:
    def __init__(self, path: Path, world: w.World):
        self.path, self.world = Path(path).absolute(), world
        self.created: list[Path] = []  # files and folders this invocation made, in order
        self._lock: Optional[Any] = None
        self.taken_over_from = ""
        self.training_started = False  # before it, a failure (bad input, a plug-in that raises) leaves nothing

    config = property(lambda self: self.path / "config.yaml")
    config_changes = property(lambda self: self.path / "config-changes.jsonl")
    rank_log = property(lambda self: self.path / f"rank{self.world.rank}.log")
    metrics = property(lambda self: self.path / METRICS)
    summary = property(lambda self: self.path / SUMMARY)
    confusion = property(lambda self: self.path / CONFUSION)
    samples = property(lambda self: self.path / SAMPLES)
    checkpoints = property(lambda self: self.path / "checkpoints")
    lock_file = property(lambda self: self.path / ".lock")

    def __str__(self) -> str:
        return str(self.path)

    def track(self, path: Path) -> Path:
        """Note that this invocation is about to create `path` (if it does not exist yet)."""
        if not path.exists():
            self.created.append(path)
        return path

    # -- ownership ---------------------------------------------------------------------------------

    def check_ranks_agree(self) -> None:
        """Every rank computed the folder on its own (world.shared_run_id); make sure they agree."""
        dirs = w.gather_objects(str(self.path.resolve()))
        if len(set(dirs)) > 1:
            raise WorldError(f"ranks disagree on the run folder ({dirs[0]} vs {dirs[-1]}); set the same "
                             "DTRAIN_RUN_ID (or hydra.run.dir=...) for every node")

    def acquire(self) -> None:
        """The main process locks the folder for the run's lifetime; every rank learns the verdict.
        A lock left by a dead process is released by the kernel, so it is simply taken over."""
        error = None
        if self.world.is_main:
            try:
                self._acquire()
            except RunFolderError as e:
                error = str(e)
        error = w.broadcast_object(error)
        if error:
            raise RunFolderError(error)

    def _acquire(self) -> None:
        f = self._guard(lambda: open(self.track(self.lock_file), "a+"), self.lock_file)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise RunFolderError(f"run folder {self.path} is in use by another dtrain job ({holder}); wait for "
                                 "it to end, or give this job its own folder (leave hydra.run.dir unset)") from None
        f.seek(0)
        self.taken_over_from = f.read().strip()  # a holder that died without releasing it (logged by the caller)

        def claim() -> None:
            f.seek(0)
            f.truncate()
            f.write(f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            f.flush()

        self._guard(claim, self.lock_file)
        self._lock = f

    def release(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                self._lock.truncate(0)  # an empty lock file means the last holder ended cleanly
            self._lock.close()
            self._lock = None

    # -- writing -----------------------------------------------------------------------------------

    @staticmethod
    def write_error(path: Path, e: OSError) -> RunFolderError:
        return RunFolderError(f"could not write {path}: {e.strerror or e}; the checkpoints already there are "
                              "untouched. Free space or fix the folder's permissions, then resume")

    def _guard(self, write, path: Path):
        try:
            return write()
        except OSError as e:
            raise self.write_error(path, e) from e

    def write_text(self, path: Path, text: str, append: bool = False) -> None:
        """Main process only, atomically (or appended and fsynced); a full disk or a read-only folder
        becomes one clear RunFolderError."""
        self.write(path, lambda: files.append_text(path, text) if append else files.write_text(path, text))

    def write(self, path: Path, writer: Callable[[], Any]) -> Any:
        """`writer()` creates or changes `path`: on the main process only, tracked and guarded."""
        if self.world.is_main:
            self.track(path)
            return self._guard(writer, path)

    def write_config(self, resolved_yaml: str, hydra_record: dict[str, str]) -> None:
        """The resolved config and Hydra's record, written once: a resumed run never rewrites them."""
        if self.config.exists():
            return
        if self.world.is_main:
            folder = self.track(self.path / ".hydra")
            self._guard(lambda: folder.mkdir(exist_ok=True), folder)
            for name, text in hydra_record.items():
                self.write_text(folder / name, text)
        self.write_text(self.config, resolved_yaml)

    def write_summary(self, summary: dict) -> None:
        self.write_text(self.summary, as_json(summary, "summary", indent=2) + "\n")

    # -- after bad input ----------------------------------------------------------------------------

    def discard_if_resultless(self) -> None:
        """After bad input: if the folder holds no result (metrics, summary, checkpoints, of this run or an
        earlier one), remove what this invocation created in it, then the folders Hydra made for it that
        are now empty. Never a file or folder that was there before."""
        if any(p.exists() for p in (self.metrics, self.summary, self.checkpoints)):
            return
        self.release()
        for path in reversed(self.created):
            with contextlib.suppress(OSError):
                path.rmdir() if path.is_dir() else path.unlink()
        existed = _existed.get("run")
        folder = self.path
        while existed is not None and existed != folder and existed in folder.parents:
            try:
                folder.rmdir()  # only if empty: a slow rank may still be writing nothing, never a file
            except OSError:
                break
            folder = folder.parent
