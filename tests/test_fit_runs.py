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


# -- what dtrain.evaluate of a fit run uses (issue 31, item 7) ------------------------------------------------

class Probe(torch.nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.fc = torch.nn.Linear(input_shape[0], num_classes)

    def forward(self, x):
        return self.fc(x)


def doubled_ce(out, y):  # a loss of the user's own, twice the task's: which one evaluate used shows
    return 2 * torch.nn.functional.cross_entropy(out, y)


def ones(out, y):  # the share of predictions that are class 1
    return (out.argmax(1) == 1).float().mean()


def splits() -> dict:  # a data factory an import finds
    return {"train": data(), "val": TensorDataset(*data()[:50])}


def test_evaluate_of_a_fit_run_uses_the_loss_metrics_and_data_fit_was_given(tmp_path, quiet_logs):
    summary = dtrain.fit(Probe, splits, loss=doubled_ce, metrics={"ones": ones},
                         overrides=[*QUICK, f"hydra.run.dir={tmp_path / 'run'}"])
    report = dtrain.evaluate(tmp_path / "run" / "checkpoints" / "latest", split="val")
    assert report["loss"] == pytest.approx(summary["val_loss"], rel=1e-6)
    assert report["ones"] == pytest.approx(summary["val_ones"], rel=1e-6) and "ones" not in dtrain.evaluate(
        tmp_path / "run" / "checkpoints" / "latest", split="val", metrics={})
    plain = dtrain.evaluate(tmp_path / "run" / "checkpoints" / "latest", split="val",
                            loss=torch.nn.functional.cross_entropy)
    assert report["loss"] == pytest.approx(2 * plain["loss"], rel=1e-6)


def test_what_fit_could_not_record_is_asked_for_in_one_line_and_then_evaluated_as_given(tmp_path, quiet_logs):
    given = data()  # a TensorDataset: a rebuilt one would be empty
    summary = dtrain.fit(Probe, given, loss=lambda out, y: 2 * torch.nn.functional.cross_entropy(out, y),
                         metrics={"ones": lambda out, y: (out.argmax(1) == 1).float().mean()},
                         overrides=[*QUICK, f"hydra.run.dir={tmp_path / 'run'}"])
    ckpt = tmp_path / "run" / "checkpoints" / "latest"
    with pytest.raises(dtrain.errors.BadInput) as refused:
        dtrain.evaluate(ckpt)
    assert str(refused.value) == (
        f"checkpoint {ckpt} was trained by dtrain.fit with its own data, loss, metrics.ones, which it cannot rebuild "
        "(an instance, or defined in a script); evaluate it from Python as fit was given them: "
        "dtrain.evaluate(ckpt, data=..., loss=..., metrics=...)")
    cli = subprocess.run([sys.executable, "-m", "dtrain.evaluate", f"ckpt={ckpt}"], cwd=tmp_path,
                         env={**CHILD_ENV, "PYTHONPATH": str(ROOT / "tests")}, capture_output=True, text=True,
                         timeout=120)  # Probe is found; the data set and the lambdas are not
    assert cli.returncode == 2 and cli.stderr.strip().splitlines() == [f"dtrain: error: {refused.value}"], cli.stderr
    report = dtrain.evaluate(ckpt, "val", data=given, loss=doubled_ce, metrics={"ones": ones})
    assert report["samples"] == summary["val_samples"] == 20  # the val split carved from it as in training
    assert (report["loss"], report["ones"]) == pytest.approx((summary["val_loss"], summary["val_ones"]), rel=1e-6)
