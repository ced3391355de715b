"""dtrain.fit and dtrain.api.train from Python: each call is a run of its own, the ranks of one job agree on
what they train, and a config that cannot be composed is one line and exit 2."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.data import TensorDataset

import dtrain
from conftest import CHILD_ENV, ROOT
from dtrain.runs import TrainingFailed

QUICK = ["trainer.epochs=1", "logger.plots=false", "data.batch_size=20"]


def data() -> TensorDataset:
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    return TensorDataset(x, (x[:, 0] > 0).long())


def test_three_fits_in_one_process_are_three_runs_in_three_folders(tmp_path, monkeypatch, quiet_logs):
    monkeypatch.chdir(tmp_path)
    summaries = [dtrain.fit(torch.nn.Linear(8, 2), data(), overrides=QUICK) for _ in range(3)]
    assert len({s["run_dir"] for s in summaries}) == 3
    assert [s["steps"] for s in summaries] == [9, 9, 9]  # each trained: none resumed an earlier fold
    named = dtrain.fit(torch.nn.Linear(8, 2), data(), overrides=[*QUICK, f"hydra.run.dir={tmp_path / 'mine'}"])
    assert named["run_dir"] == str(tmp_path / "mine")


def test_an_unknown_override_given_to_fit_is_one_line_and_exit_2(tmp_path, capsys, quiet_logs):
    with pytest.raises(TrainingFailed) as failed:
        dtrain.fit(torch.nn.Linear(8, 2), data(), overrides=["trainer.epoch=1", f"hydra.run.dir={tmp_path / 'r'}"])
    assert failed.value.code == 2
    err = capsys.readouterr().err
    assert err == "dtrain: error: Could not override 'trainer.epoch': Key 'epoch' not in 'TrainerConfig' (did you " \
                  "mean trainer.epochs?)\n"
    assert not (tmp_path / "r").exists()


def test_ranks_given_different_overrides_are_refused_naming_the_first_difference(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import os, torch, dtrain
        from torch.utils.data import TensorDataset
        x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
        rank = int(os.environ["RANK"])
        dtrain.fit(torch.nn.Linear(8, 2), TensorDataset(x, (x[:, 0] > 0).long()),
                   overrides=["trainer.epochs=1", "data.batch_size=20", f"optim.lr={{0.001 * (rank + 1)}}",
                              "hydra.run.dir={tmp_path / 'run'}"])
    """))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode != 0, done.stderr
    assert done.stderr.count("dtrain: error: the ranks disagree on what to train: optim.lr is 0.001 on rank 0 but "
                             "0.002 on rank 1; give every rank the same overrides and the same data") == 1, done.stderr
    assert "exitcode  : 2" in done.stderr and not (tmp_path / "run" / "checkpoints").exists(), done.stderr
