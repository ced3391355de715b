"""Rank-aware logging: Python logging is set up once per process (`setup_console`): every rank writes its
own `rank{N}.log` in the run folder with the rank in each line; the main rank alone writes the console, where
other ranks reach only with errors and each distinct warning once. The report that ends a run. Metrics go
to their sinks through dtrain/sinks.py."""

from __future__ import annotations

import logging
import sys

from dtrain.rundir import RunDir
from dtrain.world import World

log = logging.getLogger("dtrain")


# -- Python logging ------------------------------------------------------------------------------------

class _RankLogHandler(logging.FileHandler):
    """rank{N}.log; a write the disk refuses stops the run with the run folder's clear error instead of
    logging's printed traceback."""

    def __init__(self, run: RunDir):
        super().__init__(run.track(run.rank_log), delay=True)
        self.run = run

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            raise self.run.write_error(self.run.rank_log, error) from error
        super().handleError(record)


class _ConsoleHandler(logging.StreamHandler):
    """Writes above a live progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm = sys.modules.get("tqdm")
        if tqdm is not None and getattr(tqdm.tqdm, "_instances", None):
            try:
                tqdm.tqdm.write(self.format(record), file=self.stream)
            except Exception:
                self.handleError(record)
        else:
            super().emit(record)


class _ErrorsAndFirstWarnings(logging.Filter):
    """Non-main ranks on the console: every error, each distinct warning once (eight ranks repeating
    the same warning say nothing new)."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        message = record.getMessage()
        if record.levelno < logging.WARNING or message in self.seen:
            return False
        self.seen.add(message)
        return True


def setup_console(world: World, run: RunDir | None) -> None:
    """Every rank: INFO and above to its own rank{N}.log. Console: the main rank at INFO on stdout, other
    ranks' errors and first-time warnings on stderr. Python warnings take the same way."""
    close_console()
    log.propagate = False
    log.setLevel(logging.INFO)
    if world.is_main:
        console = _handler(_ConsoleHandler(sys.stdout), "%(message)s")
    else:
        console = _handler(_ConsoleHandler(sys.stderr), f"[rank {world.rank}] %(message)s")
        console.addFilter(_ErrorsAndFirstWarnings())
    handlers = [console]
    if run is not None:
        handlers.append(_handler(_RankLogHandler(run), f"%(asctime)s [rank {world.rank}] %(levelname)s %(message)s"))
    logging.captureWarnings(True)
    for logger in (log, logging.getLogger("py.warnings")):
        for h in handlers:
            logger.addHandler(h)


def _handler(h: logging.Handler, fmt: str) -> logging.Handler:
    h.setFormatter(logging.Formatter(fmt))
    return h


def to_file(line: str) -> None:
    """Record an error line in this rank's log file only (the caller prints it to the console itself)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, line, None, None)
    for h in log.handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


def close_console() -> None:
    logging.captureWarnings(False)
    warnings_log = logging.getLogger("py.warnings")
    for h in {*log.handlers, *warnings_log.handlers}:
        h.close()
    log.handlers.clear()
    warnings_log.handlers.clear()


def report(summary: dict, paths: dict[str, str]) -> None:
    """The short human report at the end of a run (summary.json holds every number)."""
    s = summary
    precision = f", {s['precision']}" if s.get("precision") else ""
    lines = [f"done in {duration(s['wall_time_s'])}: {s['epochs']} epoch{'s' if s['epochs'] != 1 else ''}, "
             f"{s['steps']} steps, "
             f"{s['world_size']} process{'es' if s['world_size'] > 1 else ''} on {s['device']}{precision}"]
    for split in ("train", "val", "test"):
        values = {k.removeprefix(f"{split}_"): v for k, v in s.items()
                  if k.startswith(f"{split}_") and isinstance(v, float)}
        if values:
            lines.append(f"  {split:<5} " + "  ".join(f"{k} {fmt(v)}" for k, v in values.items()))
    if s.get("best") is not None:
        lines.append(f"  best  {s['monitor']} {fmt(s['best'])} (checkpoints/{s.get('best_checkpoint', 'best.pt')})")
    units = "".join(f", {v:,.0f} {k.removesuffix('s_per_sec')}s/s" for k, v in s.items()
                    if k.endswith("s_per_sec") and k not in ("samples_per_sec", "flops_per_sec"))  # tokens, pixels
    speed = f"  speed {s['samples_per_sec']:,.0f} samples/s{units}, {fmt(s['step_time_s'])} s/step"
    if s.get("flops_per_sec"):
        speed += f", {s['flops_per_sec'] / 1e9:,.1f} GFLOP/s"
    if s.get("mfu") is not None:
        speed += f", MFU {s['mfu']:.1%}"
    lines.append(speed)
    if s.get("state_bytes_per_rank"):
        held = s["state_bytes_per_rank"]
        lines.append("  held  " + ", ".join(f"{k} {_bytes(v)}" for k, v in held.items()) + " per rank"
                     + (f"; peak {_bytes(s['peak_memory_bytes'])} allocated" if s.get("peak_memory_bytes") else ""))
    lines += [f"  {name:<5} {where}" for name, where in paths.items()]
    log.info("summary:\n" + "\n".join(lines))


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def fmt(v) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.3e}"
        return f"{v:.1f}" if abs(v) >= 100 else f"{v:.4f}"
    return str(v)
