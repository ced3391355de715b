"""The command line as a user runs it: `python -m dtrain` and `torchrun ... -m dtrain` run the same
path, write one run folder, and bad input ends with a one-line error, a non-zero exit and no folder."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import CHILD_ENV, ROOT, load_yaml, run_cli
from test_data import write_mnist


def test_the_default_job_trains_the_mlp_on_the_mnist_sample_to_94_percent(tmp_path):
    run = run_cli(tmp_path / "run")
    assert run.code == 0, run
    assert run.summary["val_acc"] >= 0.94 and run.summary["world_size"] == 1
    assert {p.name for p in run.dir.iterdir()} >= {".hydra", "config.yaml", "rank0.log", "metrics.jsonl",
                                                   "summary.json", "checkpoints"}
    assert len(run.metrics) == 5 and run.metrics[-1]["val_acc"] == run.summary["val_acc"]
    assert load_yaml(run.dir / "config.yaml")["name"] == "mlp-mnist_sample"  # resolved, not ${...}
    assert "summary:" in (run.dir / "rank0.log").read_text()


@pytest.mark.slow
def test_torchrun_with_two_ranks_agrees_on_one_timestamped_run_folder(tmp_path):
    # The real default run folder (runs/<name>/<launch time>), created relative to the working dir.
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "dtrain", "trainer.epochs=5"], cwd=tmp_path, env=CHILD_ENV,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    folders = list((tmp_path / "runs" / "mlp-mnist_sample").iterdir())
    assert len(folders) == 1, folders
    summary = json.loads((folders[0] / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["val_acc"] >= 0.94
    assert proc.stdout.count("summary:") == 1  # only rank 0 prints
    assert "Traceback" not in proc.stderr


def test_help_lists_the_config_groups_and_their_options():
    out = subprocess.run([sys.executable, "-m", "dtrain", "--help"], cwd=ROOT, env=CHILD_ENV,
                         capture_output=True, text=True, timeout=120).stdout
    for text in ("model: convnet, gpt, lenet, linear, mlp, mlp3, resnet18",
                 "optim: adagrad, adam, adamw, rmsprop, sgd", "debug: anomaly, fast, none, overfit",
                 "experiment: char_gpt, char_gpt_gpu, cifar10_convnet_tutorial, cifar10_lenet, cifar10_lenet_tutorial",
                 "trainer.precision: fp32, bf16, fp16", "data.batch_size is the GLOBAL batch"):
        assert text in out, out


def test_cfg_job_prints_the_resolved_config_with_overrides():
    out = subprocess.run([sys.executable, "-m", "dtrain", "--cfg", "job", "model=lenet", "optim.lr=0.5"],
                         cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=120).stdout
    assert "name: lenet" in out and "lr: 0.5" in out


def test_a_multirun_sweep_runs_every_combination(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dtrain", "-m", "optim.lr=0.01,0.001", "debug=fast",
                           f"hydra.sweep.dir={tmp_path}"], cwd=ROOT, env=CHILD_ENV, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = sorted(tmp_path.glob("*/summary.json"))
    assert len(summaries) == 2
    assert sorted(load_yaml(p.parent / "config.yaml")["optim"]["lr"] for p in summaries) == [0.001, 0.01]


def test_evaluate_reports_the_saved_models_accuracy(tmp_path):
    run = run_cli(tmp_path / "run", "trainer.epochs=1")
    assert run.code == 0, run
    proc = subprocess.run([sys.executable, "-m", "dtrain.evaluate", f"ckpt={run.dir}/checkpoints/best.pt",
                           "split=val"], cwd=tmp_path, env=CHILD_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["samples"] == 1000 and result["acc"] == pytest.approx(run.summary["val_acc"])
    assert list(tmp_path.iterdir()) == [tmp_path / "run"]  # evaluating writes nothing


@pytest.mark.parametrize("overrides,message", [
    (["optim.lr=-1"], "dtrain: error: optim.lr=-1.0 is not allowed: must be > 0"),
    (["data=mnist", "data.root=/nonexistent/dtrain"], "data.root='/nonexistent/dtrain' does not exist"),
    (["model=lenet", "data=regression"], "model=lenet solves classification"),
    pytest.param(["trainer.device=cuda"], "has no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="bad input only where there is no GPU")),
    (["resume=/nonexistent/ckpt.pt"], "checkpoint /nonexistent/ckpt.pt does not exist"),
    (["+trainer.epoch=3"], "dtrain: error: trainer.epoch: no such key (did you mean trainer.epochs?"),
    (["model=linear", "trainer.channels_last=true", "data=regression"], "trainer.channels_last=true needs image data"),
])
def test_bad_input_gives_one_line_a_non_zero_exit_and_leaves_no_folder(tmp_path, overrides, message):
    run = run_cli(tmp_path / "run", *overrides)
    assert run.code == 2, run
    assert message in run.err and "Traceback" not in run.err
    assert len(run.err.strip().splitlines()) == 1, run
    assert not run.dir.exists()


@pytest.mark.parametrize("override,key", [("trainer.epochz=3", "trainer.epochz"),
                                          ("trainer.epochs=abc", "trainer.epochs"),
                                          ("model=nope", "model")])
def test_unknown_keys_wrong_types_and_unknown_options_exit_non_zero_without_a_traceback(tmp_path, override, key):
    run = run_cli(tmp_path / "run", override)
    assert run.code != 0 and key in run.err and "Traceback" not in run.err, run
    assert not run.dir.exists()


def test_a_batch_that_does_not_split_across_two_ranks_is_reported_once(tmp_path):
    run = run_cli(tmp_path / "run", "data.batch_size=63", nproc=2)
    assert run.code != 0, run
    assert run.err.count("data.batch_size=63 is not allowed") == 1, run
    # The one traceback is torchrun's own report that a child failed; the ranks print none.
    assert run.err.count("Traceback") == 1 and "ChildFailedError" in run.err, run
    assert not run.dir.exists()


@pytest.mark.slow
def test_evaluate_takes_data_root_as_its_docstring_shows_and_defaults_to_a_split_the_data_has(tmp_path):
    write_mnist(tmp_path / "data")
    run = run_cli(tmp_path / "run", "data=mnist", f"data.root={tmp_path}/data", "data.download=false",
                  "data.batch_size=6", "data.eval_batch_size=2", "trainer.epochs=1")
    assert run.code == 0, run
    (tmp_path / "data").rename(tmp_path / "moved")  # the data set moved since training
    proc = subprocess.run([sys.executable, "-m", "dtrain.evaluate", f"ckpt={run.dir}/checkpoints/best.pt",
                           f"data.root={tmp_path}/moved"], cwd=tmp_path, env=CHILD_ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["split"], result["samples"]) == ("test", 20)
    sample = run_cli(tmp_path / "sample", "trainer.max_steps=2")  # the bundled sample has no test split
    proc = subprocess.run([sys.executable, "-m", "dtrain.evaluate", f"ckpt={sample.dir}/checkpoints/best.pt"],
                          cwd=tmp_path, env=CHILD_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and json.loads(proc.stdout.splitlines()[-1])["split"] == "val", proc.stderr


def test_a_users_own_config_folder_adds_experiments_with_hydras_config_dir(tmp_path):
    mine = tmp_path / "my-conf" / "experiment"
    mine.mkdir(parents=True)
    (mine / "tiny_lenet.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: lenet\n  - override /data: synthetic\n"
        "data:\n  shape: [1, 28, 28]\n  num_samples: 256\n  batch_size: 32\ntrainer:\n  max_steps: 2\n")
    run = run_cli(tmp_path / "run", "--config-dir", str(tmp_path / "my-conf"), "experiment=tiny_lenet")
    assert run.code == 0, run
    assert (run.summary["model"], run.summary["data"], run.summary["steps"]) == ("lenet", "synthetic", 2)


def test_a_non_editable_install_runs_the_default_job_from_any_folder(tmp_path):
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the repository
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "tests", "*.egg-info",
                                                              "__pycache__", "build"))
    prefix = tmp_path / "prefix"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(prefix), str(src)], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-3000:]
    shutil.rmtree(src)  # nothing may still point at the source tree
    shipped = prefix / "dtrain" / "conf"  # every config file, hydra/launcher/slurm.yaml included
    assert sorted(p.relative_to(shipped) for p in shipped.rglob("*.yaml")) == \
        sorted(p.relative_to(ROOT / "conf") for p in (ROOT / "conf").rglob("*.yaml"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**CHILD_ENV, "PYTHONPATH": str(prefix)}
    where = subprocess.run([sys.executable, "-c", "import dtrain; print(dtrain.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.startswith(str(prefix)), where
    proc = subprocess.run([sys.executable, "-m", "dtrain", "debug=fast"], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = list((elsewhere / "runs" / "mlp-mnist_sample").glob("*/summary.json"))
    assert len(summaries) == 1 and json.loads(summaries[0].read_text())["steps"] == 2
