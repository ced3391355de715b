"""The research examples (examples/vae, examples/segmentation, examples/textcls), each a user's project as
first written: installed (not editable) with dtrain, run from another folder on 2 ranks, stopped by SIGTERM
to the whole process group mid-epoch, resumed, and ending bit-identical to the uninterrupted run."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import CHILD_ENV, FAULTS, ROOT, Live, assert_same_weights

EXAMPLES = {  # package, experiment, overrides, the step after which the stopped run slows and is signalled
    "vae": ("vae", ("trainer.epochs=2",), 10),
    "segmentation": ("segnet", ("trainer.epochs=3",), 10),
    "textcls": ("textcls", ("trainer.epochs=2",), 10),
}
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """dtrain and the three example packages installed into a prefix (not editable); each project's config
    folder copied elsewhere without its code; a third folder to run from."""
    base = tmp_path_factory.mktemp("research")
    src, prefix = base / "dtrain-src", base / "prefix"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "tests", "examples",
                                                              "*.egg-info", "__pycache__", "build"))
    confs = {}
    for name, (package, _, _) in EXAMPLES.items():
        project = shutil.copytree(ROOT / "examples" / name, base / name,
                                  ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
        confs[name] = str(project / "conf")
    for package in (src, *(base / name for name in EXAMPLES)):
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--target", str(prefix), str(package)], capture_output=True, text=True, timeout=300)
        assert pip.returncode == 0, pip.stderr[-3000:]
    shutil.rmtree(src)
    for name, (package, _, _) in EXAMPLES.items():
        shutil.rmtree(base / name / package)  # the project's code runs from the installed package only
    (base / "elsewhere").mkdir()
    return SimpleNamespace(env={**CHILD_ENV, "PYTHONPATH": str(prefix)}, cwd=base / "elsewhere", confs=confs)


def command(installed, name: str, run_dir: Path, *target: str) -> list[str]:
    _, overrides, _ = EXAMPLES[name]
    return [*TORCHRUN, *target, "--config-dir", installed.confs[name], f"experiment={name}", *overrides,
            "trainer.log_every_n_steps=1", f"hydra.run.dir={run_dir}"]


def final(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip(),
                      weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXAMPLES))
def test_an_example_stopped_by_sigterm_to_the_group_on_2_ranks_resumes_bit_identical(installed, tmp_path, name):
    _, _, slow_from = EXAMPLES[name]
    reference = subprocess.run([sys.executable, *command(installed, name, tmp_path / "ref", "-m", "dtrain")],
                               cwd=installed.cwd, env=installed.env, capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert str(ROOT) not in reference.stdout + reference.stderr  # the installed dtrain and package ran
    job = Live(*command(installed, name, tmp_path / "run", FAULTS), cwd=installed.cwd,
               env={**installed.env, "DTRAIN_FAULT": f"slow:0:{slow_from}"})
    job.wait_for(f" step {slow_from + 2}/")
    job.signal_group(signal.SIGTERM)  # torchrun, both ranks and any loader workers, as SLURM and `timeout` do
    assert job.finish(timeout=240) != 0, job
    assert "checkpoint saved" in job.stdout, job
    resumed = subprocess.run([sys.executable, *command(installed, name, tmp_path / "run", "-m", "dtrain")],
                             cwd=installed.cwd, env=installed.env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    ref, res = final(tmp_path / "ref"), final(tmp_path / "run")
    assert_same_weights(ref["model"], res["model"], rtol=0, atol=0)
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("ref", "run")]
    assert summaries[0]["steps"] == summaries[1]["steps"] and summaries[1]["world_size"] == 2
    monitored = summaries[1]["monitor"]
    assert summaries[1][monitored] == summaries[0][monitored]  # the same validation, to the bit
    if name == "vae":  # its own steps: what its validation_step returns, the best by val_recon (lower)
        assert monitored == "val_recon" and {"val_recon", "val_kl"} <= set(summaries[1])
    if name == "segmentation":  # the data set's own task attribute: segmentation's metrics
        assert monitored == "val_miou" and summaries[1]["val_miou"] > 0.5  # all background: about 0.27
    if name == "textcls":  # the padding collate and the embedding's own parameter group
        assert summaries[1]["val_acc"] > 0.6
        default, embedding = res["optimizer"]["param_groups"]  # the default group first, then optim.param_groups
        assert (default["lr"], default["weight_decay"], len(default["params"])) == (0.01, 0.01, 4)  # the head
        assert (embedding["lr"], embedding["weight_decay"], len(embedding["params"])) == (0.003, 0.0, 1)
