"""Callbacks at every step, on an exception and at teardown: a user's EMA of the weights (tests/ema_callback.py)
stopped by SIGTERM to the whole process group and resumed ends with exactly the shadow weights and update
count of an uninterrupted run, and its on_exception and teardown hooks run."""

import signal

import pytest
import torch

from conftest import FAULTS, ROOT, Live, make_trainer, run_cli

JOB = ("trainer.epochs=2", "data=synthetic", "data.num_samples=640", "data.shape=[1,8,8]", "data.batch_size=32",
       "trainer.log_every_n_steps=5", "checkpoint.every_n_steps=7", "logger.plots=false", "model=mlp3",
       "+callbacks.ema._target_=ema_callback.EMA")
ENV = {"PYTHONPATH": str(ROOT / "tests")}


def ema(run_dir) -> dict:
    return torch.load(run_dir / "ema.pt", weights_only=True)


def assert_same_ema(a: dict, b: dict) -> None:
    assert a["updates"] == b["updates"] > 0
    assert a["shadow"].keys() == b["shadow"].keys()
    for name in a["shadow"]:
        assert torch.equal(a["shadow"][name], b["shadow"][name]), name


def stopped_by_sigterm_to_the_group(run_dir, *overrides, nproc: int = 1) -> int:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    job = Live(*launcher, FAULTS, *JOB, *overrides, f"hydra.run.dir={run_dir}",
               env={**ENV, "DTRAIN_FAULT": "slow:0:12"})  # slow from step 12, so the signal comes mid-epoch
    job.wait_for("step 15/")
    job.signal_group(signal.SIGTERM)
    return job.finish(timeout=240)


@pytest.mark.parametrize("overrides,nproc", [
    ((), 1),
    pytest.param((), 2, marks=pytest.mark.slow),
    pytest.param(("dist.strategy=ddp", "checkpoint.format=dcp"), 2, marks=pytest.mark.slow),
], ids=["one-process-file", "two-ranks-file", "two-ranks-dcp"])
def test_an_ema_callback_stopped_by_sigterm_to_the_group_resumes_to_the_uninterrupted_shadow(tmp_path, overrides,
                                                                                          nproc):
    reference = run_cli(tmp_path / "reference", *JOB, *overrides, nproc=nproc, env=ENV)
    assert reference.code == 0, reference
    run = tmp_path / "run"
    code = stopped_by_sigterm_to_the_group(run, *overrides, nproc=nproc)
    assert code == (75 if nproc == 1 else 1), code  # torchrun itself exits 1 after its workers' 75
    assert (run / "exception-rank0.txt").read_text() == "Preempted"
    stopped_at = int((run / "teardown-rank0.txt").read_text())
    assert 15 <= stopped_at < reference.summary["steps"]
    resumed = run_cli(run, *JOB, *overrides, nproc=nproc, env=ENV)
    assert resumed.code == 0 and "resumed from" in resumed.out, resumed
    assert_same_ema(ema(reference.dir), ema(run))
    assert resumed.summary["ema_updates"] == reference.summary["steps"]
    assert int((run / "teardown-rank0.txt").read_text()) == reference.summary["steps"]


def test_on_exception_and_teardown_run_when_training_crashes(tmp_path, quiet_logs, monkeypatch):
    import sys
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    sys.modules.pop("ema_callback", None)
    t = make_trainer(tmp_path, *JOB[:8], "+callbacks.ema._target_=ema_callback.EMA")

    def crash():
        raise RuntimeError("a crash in the loop")
    t.optimizer_step = crash
    with pytest.raises(RuntimeError, match="a crash in the loop"):
        t.fit()
    assert (tmp_path / "exception-rank0.txt").read_text() == "RuntimeError"
    assert (tmp_path / "teardown-rank0.txt").read_text() == "0"
