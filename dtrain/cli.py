"""Training from the command line: the Hydra main that `python -m dtrain`, `torchrun ... -m dtrain`, `srun
python -m dtrain` and the launcher's one-process run all go through.

Exit codes: 0 done; 1 a rank failed (its message names the rank); 2 bad input (config, data, checkpoint,
world); 75 stopped by SIGTERM/SIGUSR1 after saving a checkpoint (requeue and it resumes); 130 Ctrl-C.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dtrain import app, cmdline, runs
from dtrain import world as w
from dtrain.errors import EXIT_BAD_INPUT
from dtrain.rundir import RunDir


def main() -> None:
    """Hydra's flags (--config-dir, --config-name, -m, ...) anywhere among the overrides, as users type them:
    Hydra's own parser takes them only first (dtrain/cmdline.py)."""
    sys.argv[1:] = cmdline.split(sys.argv[1:]).in_hydra_order()
    hydra_main()


@hydra.main(config_path=app.CONF_DIR, config_name=app.CONFIG_NAME, version_base="1.3")
def hydra_main(dcfg: DictConfig) -> None:
    run = RunDir(Path(HydraConfig.get().runtime.output_dir), w.from_launcher())
    code = app.start(lambda: app.make_config(dcfg), lambda cfg, world: runs.run_training(cfg, world, run, dcfg))
    if code == EXIT_BAD_INPUT or code and not run.training_started:
        run.discard_if_resultless()
    if code:
        sys.exit(code)
