"""Hydra's flags anywhere on the command line (issue 31, item 8): `python -m dtrain`, its workers and the
launcher take `--config-dir`, `--config-name` and `-m` before, between or after the overrides, as users type
them (Hydra's own parser takes them only first)."""

import json
import subprocess
import sys

import pytest

from conftest import CHILD_ENV, run_cli
from dtrain import cmdline

TINY = ("logger=none", "trainer.device=cpu", "checkpoint.enabled=false")


@pytest.fixture
def my_conf(tmp_path):
    """A user's config folder: a model of their own and a primary config of their own."""
    conf = tmp_path / "my-conf"
    (conf / "model").mkdir(parents=True)
    (conf / "model" / "mine.yaml").write_text("_target_: dtrain.models.mlp3\nname: mine\ndropout: 0.0\n")
    (conf / "short.yaml").write_text("# @package _global_\ndefaults:\n  - config\n  - _self_\n"
                                     "trainer:\n  max_steps: 3\n")
    return conf


@pytest.mark.unit
@pytest.mark.parametrize("argv,flags,overrides", [
    (["a=1", "--config-dir", "D", "b=2"], ["--config-dir", "D"], ["a=1", "b=2"]),
    (["a=1", "-m", "b=1,2", "-cd", "D", "--config-name=x"], ["-m", "-cd", "D", "--config-name=x"],
     ["a=1", "b=1,2"]),
    (["--info", "a=1"], ["--info=all"], ["a=1"]),  # --info's value is optional: an override is not it
    (["a=1", "--info"], ["--info=all"], ["a=1"]),  # so a bare one, moved first, must not take the override
    (["--info", "searchpath", "a=1"], ["--info", "searchpath"], ["a=1"]),
    (["+x=1", "~y", "--cfg", "job"], ["--cfg", "job"], ["+x=1", "~y"]),
])
def test_hydras_flags_keep_their_values_and_move_before_the_overrides(argv, flags, overrides):
    args = cmdline.split(argv)
    assert (args.flags, args.overrides) == (flags, overrides)
    assert args.in_hydra_order() == [*flags, *overrides]


def test_python_m_dtrain_takes_config_dir_and_config_name_after_the_overrides(tmp_path, my_conf):
    run = run_cli(tmp_path / "run", "model=mine", *TINY, "--config-dir", str(my_conf), "--config-name", "short")
    assert run.code == 0, run
    assert (run.summary["model"], run.summary["steps"]) == ("mine", 3)


def test_the_launcher_sweeps_with_m_anywhere_each_point_in_its_own_folder(tmp_path, my_conf):
    proc = subprocess.run([sys.executable, "-m", "dtrain.launch", "model=mine", *TINY, "trainer.max_steps=1,2",
                           "--config-dir", str(my_conf), "-m"], cwd=tmp_path, env=CHILD_ENV, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sweep point 1/2" in proc.stdout and "sweep point 2/2" in proc.stdout
    [sweep] = (tmp_path / "runs" / "multirun").iterdir()  # as `python -m dtrain -m` names them
    steps = {p.parent.name: json.loads(p.read_text())["steps"] for p in sweep.glob("*/summary.json")}
    assert steps == {"0-mine-mnist_sample": 1, "1-mine-mnist_sample": 2}


def test_every_point_of_a_sweep_is_validated_before_any_runs(tmp_path, my_conf):
    proc = subprocess.run([sys.executable, "-m", "dtrain.launch", "-m", "model=mine", *TINY,
                           "trainer.max_steps=1", "optim.lr=0.1,-1", "--config-dir", str(my_conf)],
                          cwd=tmp_path, env=CHILD_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == \
        "dtrain: error: optim.lr=-1.0 is not allowed: must be > 0", proc.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "my-conf"]  # the first point did not run either


@pytest.mark.slow
def test_the_launchers_workers_take_config_dir_after_the_launcher_keys(tmp_path, my_conf):
    # The README's own order: launcher keys, then --config-dir, then the overrides.
    run = run_cli(tmp_path / "run", "launcher.nproc_per_node=2", "--config-dir", str(my_conf), "model=mine", *TINY,
                  "--config-name", "short", launcher=[sys.executable], target=("-m", "dtrain.launch"))
    assert run.code == 0, run
    assert (run.summary["model"], run.summary["steps"], run.summary["world_size"]) == ("mine", 3, 2)


def test_a_sweeps_own_subdir_names_its_folders_and_hydras_launchers_are_python_m_dtrains(tmp_path, my_conf):
    proc = subprocess.run([sys.executable, "-m", "dtrain.launch", "-m", "model=mine", *TINY, "trainer.max_steps=1",
                           "optim.lr=0.1,0.2", "hydra.sweep.subdir=lr${optim.lr}", "--config-dir", str(my_conf)],
                          cwd=tmp_path, env=CHILD_ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [sweep] = (tmp_path / "runs" / "multirun").iterdir()
    assert sorted(p.parent.name for p in sweep.glob("*/summary.json")) == ["lr0.1", "lr0.2"]
    refused = subprocess.run([sys.executable, "-m", "dtrain.launch", "-m", "optim.lr=0.1,0.2", "hydra/launcher=slurm"],
                             cwd=tmp_path, env=CHILD_ENV, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr.startswith(
        "dtrain: error: hydra/launcher=slurm: dtrain.launch -m sweeps the points one after another itself"), \
        refused.stderr
