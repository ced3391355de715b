"""The run folder: the one object that knows which files a run writes there, and when it may discard them.

    config.yaml     the resolved config          (main process)
    train.log       what the console showed      (main process)
    metrics.jsonl   one JSON object per epoch    (main process, logs.JsonlSink)
    summary.json    final metrics and timings    (main process)
    checkpoints/    step-*.pt, latest, best.pt   (main process, checkpoint.Checkpointer)
    .hydra/         Hydra's own record           (Hydra, main process)
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

from dtrain import world as w
from dtrain.errors import WorldError
from dtrain.world import World


class RunDir:
    def __init__(self, path: Path, world: World):
        self.path, self.world = Path(path), world

    config = property(lambda self: self.path / "config.yaml")
    train_log = property(lambda self: self.path / "train.log")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    summary = property(lambda self: self.path / "summary.json")
    checkpoints = property(lambda self: self.path / "checkpoints")

    def __str__(self) -> str:
        return str(self.path)

    def check_ranks_agree(self) -> None:
        """Every rank computed the folder on its own (world.shared_run_id); make sure they agree."""
        dirs = w.gather_objects(str(self.path.resolve()))
        if len(set(dirs)) > 1:
            raise WorldError(f"ranks disagree on the run folder ({dirs[0]} vs {dirs[-1]}); set the same "
                             "DTRAIN_RUN_ID (or hydra.run.dir=...) for every node")

    def write_config(self, resolved_yaml: str) -> None:
        if self.world.is_main:
            self.config.write_text(resolved_yaml)

    def write_summary(self, summary: dict) -> None:
        if self.world.is_main:
            self.summary.write_text(json.dumps(summary, indent=2) + "\n")

    def discard_if_resultless(self) -> None:
        """Remove a run folder that bad input left holding no results (never one that has any). Hydra makes
        the folder on every rank, so a slow rank may re-make it after the main rank removed it: each
        non-main rank removes it too if it is empty."""
        results = (self.metrics, self.summary, self.checkpoints)
        if self.world.is_main and self.path.is_dir() and not any(r.exists() for r in results):
            shutil.rmtree(self.path, ignore_errors=True)
        elif not self.world.is_main:
            with contextlib.suppress(OSError):
                self.path.rmdir()
