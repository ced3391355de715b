"""Train: `python -m dtrain` (one process) and `torchrun ... -m dtrain` (DDP) run this same path.

Exit codes: 0 done; 1 a rank failed (its message names the rank); 2 bad input (config, data, checkpoint,
world); 75 stopped by SIGTERM/SIGUSR1 after saving a checkpoint (requeue and it resumes).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dtrain import app, logs
from dtrain import world as w
from dtrain.config import Config
from dtrain.errors import EXIT_BAD_INPUT
from dtrain.rundir import RunDir
from dtrain.trainer import Trainer


def train(cfg: Config, world: w.World, run: RunDir, dcfg: DictConfig) -> dict:
    run.check_ranks_agree()
    run.acquire()  # before writing anything: a second job aimed at a live run's folder stops here
    try:
        logs.setup_console(world, run)
        if run.taken_over_from:
            logs.log.warning(f"run folder {run}: taking over from a job that ended without releasing it "
                             f"({run.taken_over_from})")
        hydra = HydraConfig.get()
        run.write_config(OmegaConf.to_yaml(dcfg, resolve=True), {
            "config.yaml": OmegaConf.to_yaml(dcfg), "overrides.yaml": OmegaConf.to_yaml(list(hydra.overrides.task)),
            "hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra}))})
        trainer = Trainer(cfg, world, run)
        try:
            return trainer.fit()
        finally:
            trainer.close()
    finally:
        run.release()


@hydra.main(config_path=app.CONF_DIR, config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    run = RunDir(Path(HydraConfig.get().runtime.output_dir), w.from_launcher())
    code = app.start(lambda: app.make_config(dcfg), lambda cfg, world: train(cfg, world, run, dcfg))
    if code == EXIT_BAD_INPUT:
        run.discard_if_resultless()
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
