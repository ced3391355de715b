"""The errors dtrain reports to the user as one line, and the exit codes they map to.

The bottom floor of the package: it imports nothing from dtrain, so every module can raise these
without import cycles. Each `BadInput` message names what is wrong and what to do. It also records a
process's exit code where dtrain.launch reads it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Mapping, Optional

EXIT_OK = 0
EXIT_FAILED = 1  # a rank failed: its message, prefixed [rank R], says why
EXIT_BAD_INPUT = 2  # config, data, checkpoint or world cannot work
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after a checkpoint; requeue and it resumes
EXIT_INTERRUPTED = 130  # 128 + SIGINT: stopped by Ctrl-C (after a checkpoint, when checkpointing is on)


class BadInput(Exception):
    """Input that cannot work; exit 2, nothing of the user's lost."""
    same_on_every_rank = False  # True: every rank raises it, so only the main rank reports it


class ConfigError(BadInput, ValueError):
    """A config value that cannot work (the same on every rank, so reported once)."""
    same_on_every_rank = True


class DataError(BadInput, RuntimeError):
    """A data set that is missing or unreadable; the message says which files to put where."""


class CheckpointError(BadInput, RuntimeError):
    """A checkpoint that cannot be written or used; the message names the file and what to do."""


class ContractError(BadInput, TypeError):
    """A user's model, loss, metric or callback broke dtrain's contract with it; the message names which and
    what the contract is."""


class WorldError(BadInput, RuntimeError):
    """The process world cannot be formed as asked."""


class Diverged(FloatingPointError):
    """The training loss or a validation metric became NaN or infinite: exit 1, one line naming where."""


class Preempted(Exception):
    """A stop signal arrived on some rank; every rank stops after the same step and leaves with `code`."""

    def __init__(self, signum: int, code: int):
        super().__init__(signum)
        self.signum, self.code = signum, code


def os_error(e: BaseException) -> "OSError | None":
    """The OSError under `e`, if any: torch reports a write the disk refused as a RuntimeError raised while
    handling it ("enforce fail at inline_container.cc"), and a distributed checkpoint as a
    CheckpointException holding each rank's error."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        err = todo.pop(0)
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, OSError):
            return err
        failures = getattr(err, "failures", None)
        if isinstance(failures, dict):  # torch.distributed.checkpoint's CheckpointException: rank -> (error, trace)
            todo += [f[0] if isinstance(f, tuple) else f for _, f in sorted(failures.items())]
        todo += [err.__cause__, err.__context__]
    return None


def first_line(e: BaseException) -> str:
    """What went wrong, in one line: the OSError's reason where there is one, else the error's first line."""
    found = os_error(e)
    if found is not None:
        return found.strerror or str(found)
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:  # a CheckpointException's own text is a traceback per rank
        rank, failure = sorted(failures.items())[0]
        e = failure[0] if isinstance(failure, tuple) else failure
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# -- exit codes recorded for dtrain.launch --------------------------------------------------------------------

EXIT_CODE_DIR = "DTRAIN_EXIT_CODE_DIR"  # set by dtrain.launch: where each worker leaves its exit code
recorded: Optional[int] = None  # the exit code this process has recorded, if any


def record_exit_code(code: int, env: Mapping[str, str] = os.environ) -> None:
    """Leave this rank's exit code where dtrain.launch reads it after a stop signal (the agent that
    forwards the signal does not report the workers' own codes)."""
    global recorded
    recorded = code
    if env.get(EXIT_CODE_DIR):
        rank = env.get("RANK") or env.get("SLURM_PROCID") or "0"
        with contextlib.suppress(OSError):
            Path(env[EXIT_CODE_DIR], f"rank{rank}").write_text(str(code))


def read_exit_codes(folder: Path) -> dict[int, int]:
    """{rank: exit code} of the workers that left one in `folder`."""
    codes = {}
    for f in folder.glob("rank*"):
        with contextlib.suppress(OSError, ValueError):
            codes[int(f.name.removeprefix("rank"))] = int(f.read_text())
    return codes
