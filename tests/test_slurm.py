"""`srun` alone (no torchrun) starts the ranks: dtrain reads SLURM's variables and trains like torchrun.
Runs where a SLURM cluster answers; `slurm/local-cluster.sh start` brings up a one-host one (CI does)."""

import shutil
import subprocess
import sys

import pytest

from conftest import CHILD_ENV, Run, assert_same_weights, final_state, run_cli


def cluster_up() -> bool:
    if shutil.which("srun") is None:
        return False
    return subprocess.run(["sinfo", "-h"], env=CHILD_ENV, capture_output=True, timeout=20).returncode == 0


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not cluster_up(), reason="no SLURM cluster answers (slurm/local-cluster.sh start)")]

SMALL = ("model=mlp3", "data=synthetic", "data.shape=[1,12,12]", "data.num_samples=1001",
         "data.batch_size=32", "data.eval_batch_size=64", "optim=sgd", "trainer.epochs=2", "seed=3")


def test_srun_alone_starts_two_ranks_that_train_like_one_process(tmp_path):
    one = run_cli(tmp_path / "one", *SMALL)
    proc = subprocess.run(["srun", "-n2", "--kill-on-bad-exit=1", sys.executable, "-m", "dtrain", *SMALL],
                          cwd=tmp_path, env=CHILD_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # The run folder is named after the SLURM job, so every rank (and a requeued job) finds the same one.
    folders = list((tmp_path / "runs" / "mlp3-synthetic").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("job"), folders
    srun = Run(subprocess.CompletedProcess([], 0, proc.stdout, proc.stderr), folders[0])
    assert "launcher=slurm" in proc.stdout and srun.summary["world_size"] == 2
    assert_same_weights(final_state(one), final_state(srun))
