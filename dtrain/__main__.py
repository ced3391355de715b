"""Entry point: `python -m dtrain` (one process) and `torchrun ... -m dtrain` (DDP) run this same path.

Exit codes: 0 done; 1 a rank failed (its message names the rank); 2 bad input (config, data, checkpoint,
world); 75 stopped by SIGTERM/SIGUSR1 after saving a checkpoint (requeue and it resumes).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dtrain import config, logs
from dtrain import world as w
from dtrain.checkpoint import CheckpointError
from dtrain.config import Config, ConfigError
from dtrain.data import DataError
from dtrain.trainer import PREEMPTED_EXIT_CODE, Preempted, Trainer

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
BAD_INPUT = (ConfigError, DataError, CheckpointError, w.WorldError)
EXIT_FAILED, EXIT_BAD_INPUT = 1, 2

config.register()


def train(cfg: Config, world: w.World, run_dir: Path, resolved_yaml: str) -> None:
    dirs = w.gather_objects(str(run_dir.resolve()))
    if len(set(dirs)) > 1:
        raise w.WorldError(f"ranks disagree on the run folder ({dirs[0]} vs {dirs[-1]}); set the same "
                           "DTRAIN_RUN_ID (or hydra.run.dir=...) for every node")
    logs.setup_console(world, run_dir)
    if world.is_main:
        (run_dir / "config.yaml").write_text(resolved_yaml)
    trainer = Trainer(cfg, world, run_dir)
    try:
        trainer.fit()
    finally:
        trainer.close()


def guarded(fn, world: w.World, timeout_s: float | None = None) -> int:
    """Run `fn` (returning an exit code or None), turning any exception into an exit code and a message
    that names this rank. Catching here, inside the process group's block, lets the traceback and all
    it holds (model, optimizer, loader) die before the group is torn down.
    """
    try:
        return fn() or 0
    except Preempted:
        return PREEMPTED_EXIT_CODE
    except ConfigError as e:  # the same on every rank: say it once
        if world.is_main:
            report(f"dtrain: error: {e}")
        return EXIT_BAD_INPUT
    except BAD_INPUT as e:
        report(f"{prefix(world)}dtrain: error: {e}")
        return EXIT_BAD_INPUT
    except Exception as e:
        if world.distributed and w.is_collective_failure(e):
            report(f"{prefix(world)}dtrain: a collective did not complete within dist.timeout_s={timeout_s:g}: "
                   f"another rank is stuck or has died (see its own message); "
                   f"{type(e).__name__}: {str(e).splitlines()[0]}")
            return EXIT_FAILED
        report(f"{prefix(world)}dtrain: {type(e).__name__}: {e}", traceback.format_exc())
        return EXIT_FAILED


def prefix(world: w.World) -> str:
    return f"[rank {world.rank}] " if world.distributed else ""


def report(line: str, detail: str = "") -> None:
    logs.to_file(line)
    print(line, file=sys.stderr, flush=True)
    if detail:
        print(detail, file=sys.stderr, flush=True)


def discard_if_resultless(run_dir: Path, world: w.World) -> None:
    """Remove a run folder that bad input left holding no results (never one that has any). Hydra makes
    the folder on every rank, so a slow rank may re-make it after the main rank removed it: each
    non-main rank removes it too if it is empty."""
    results = ("metrics.jsonl", "summary.json", "checkpoints")
    if world.is_main and run_dir.is_dir() and not any((run_dir / r).exists() for r in results):
        shutil.rmtree(run_dir, ignore_errors=True)
    elif not world.is_main:
        with contextlib.suppress(OSError):
            run_dir.rmdir()


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    world = w.World(rank=w.env_rank())  # enough to report errors until the real one is known

    def setup_and_train() -> int:
        nonlocal world
        cfg = config.to_config(dcfg)
        world = w.from_env(cfg.trainer.device, cfg.dist.backend)
        config.check_batch_split(cfg, world.world_size)
        with w.process_group(world, cfg.dist.timeout_s):
            return guarded(lambda: train(cfg, world, run_dir, OmegaConf.to_yaml(dcfg, resolve=True)), world,
                           cfg.dist.timeout_s)

    code = guarded(setup_and_train, world)
    logs.close_console()
    if code == EXIT_BAD_INPUT:
        discard_if_resultless(run_dir, world)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
