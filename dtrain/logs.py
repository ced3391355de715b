"""Rank-aware logging: the main process writes the console, train.log and metrics sinks; other ranks
only report warnings and errors, prefixed with their rank. New sinks (wandb, TensorBoard, ...) are one
entry in SINKS."""

from __future__ import annotations

import json
import logging
import math
import sys
from typing import Callable, Protocol

from dtrain.config import LoggerConfig
from dtrain.rundir import RunDir
from dtrain.world import World

log = logging.getLogger("dtrain")


class _RunLogHandler(logging.FileHandler):
    """train.log; a write the disk refuses stops the run with the run folder's clear error instead of
    logging's printed traceback."""

    def __init__(self, run: RunDir):
        super().__init__(run.track(run.train_log), delay=True)
        self.run = run

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            raise self.run.write_error(self.run.train_log, error) from error
        super().handleError(record)


def setup_console(world: World, run: RunDir | None) -> None:
    """Main rank: INFO to stdout and to the run's train.log. Other ranks: WARNING and above to stderr."""
    log.handlers.clear()
    log.propagate = False
    if world.is_main:
        log.setLevel(logging.INFO)
        log.addHandler(_handler(logging.StreamHandler(sys.stdout), "%(message)s"))
        if run is not None:
            log.addHandler(_handler(_RunLogHandler(run),
                                    "%(asctime)s %(levelname)s %(message)s"))
    else:
        log.setLevel(logging.WARNING)
        log.addHandler(_handler(logging.StreamHandler(sys.stderr), f"[rank {world.rank}] %(message)s"))


def _handler(h: logging.Handler, fmt: str) -> logging.Handler:
    h.setFormatter(logging.Formatter(fmt))
    return h


def to_file(line: str) -> None:
    """Record an error line in train.log only (the caller prints it to the console itself)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, line, None, None)
    for h in log.handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


def close_console() -> None:
    for h in log.handlers:
        h.close()
    log.handlers.clear()


class Sink(Protocol):
    def write(self, kind: str, metrics: dict) -> None: ...  # kind: "step" | "epoch"
    def close(self) -> None: ...


class JsonlSink:
    """metrics.jsonl: one JSON object per epoch, appended and flushed as it happens."""

    def __init__(self, run: RunDir, cfg: LoggerConfig):
        self.run, self.path = run, run.metrics  # written on the first epoch: a run failing before has none

    def write(self, kind: str, metrics: dict) -> None:
        if kind == "epoch":
            self.run.write_text(self.path, json.dumps(metrics) + "\n", append=True)

    def rewind(self, step: int) -> None:
        """Drop lines logged after `step` (a resumed run logs those epochs again)."""
        if self.path.exists():
            lines = self.path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if json.loads(line)["step"] <= step]
            if len(kept) != len(lines):
                tmp = self.path.with_suffix(".tmp")
                self.run.write_text(tmp, "".join(kept))
                tmp.replace(self.path)

    def close(self) -> None:
        pass


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3e}" if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5) else f"{v:.4f}"
    return str(v)


class ConsoleSink:
    def __init__(self, run: RunDir, cfg: LoggerConfig):
        pass

    def write(self, kind: str, metrics: dict) -> None:
        head = f"epoch {metrics['epoch']} step {metrics['step']}"
        rest = " ".join(f"{k} {_fmt(v)}" for k, v in metrics.items() if k not in ("epoch", "step"))
        log.info(f"{head} | {rest}" if kind == "epoch" else f"  {head} {rest}")

    def close(self) -> None:
        pass


SINKS: dict[str, Callable[[RunDir, LoggerConfig], Sink]] = {
    "console": ConsoleSink,
    "jsonl": JsonlSink,
}


class MetricLogger:
    """Fans metrics out to the configured sinks; holds none on non-main ranks."""

    def __init__(self, world: World, run: RunDir, cfg: LoggerConfig):
        names = [n for n in SINKS if getattr(cfg, n, False)] if world.is_main else []
        self.sinks: list[Sink] = [SINKS[n](run, cfg) for n in names]

    def step(self, metrics: dict) -> None:
        for s in self.sinks:
            s.write("step", metrics)

    def rewind(self, step: int) -> None:
        for s in self.sinks:
            if hasattr(s, "rewind"):
                s.rewind(step)

    def epoch(self, metrics: dict) -> None:
        metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        for s in self.sinks:
            s.write("epoch", metrics)

    def close(self) -> None:
        for s in self.sinks:
            s.close()
