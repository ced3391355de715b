"""How dtrain writes a file so that no reader ever sees half of it and no failure goes unnoticed: a temporary
name in the same folder, written, flushed and fsynced, renamed over the real name, and the folder fsynced
(a full disk or a read-only folder raises here, never later in a garbage collector). Appending a line
(metrics.jsonl) flushes and fsyncs it before returning. The checkpoint files, the run folder's files and the
plots are all written through these."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any, Callable


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Make every file of `folder` durable (a rename must not outrun the data of what it renames)."""
    for file in folder.iterdir():
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def free_bytes(folder: Path) -> "int | None":
    """Bytes an unprivileged write could still use on `folder`'s file system (None: unknown)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """`write(f)` into a temporary file beside `path`, made durable and renamed to `path`; on any failure the
    temporary file is removed and `path` is as it was."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def append_text(path: Path, text: str) -> None:
    """`text` added at the end of `path` (created if missing), on the disk when this returns."""
    with open(path, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
