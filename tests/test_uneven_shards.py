"""Evaluation shards that do not divide evenly: under FSDP every forward is a collective, so every rank runs as
many forwards as the rank with the most batches, while each sample is still counted once. The oracle is the
same checkpoint evaluated in one process."""

import pytest

import dtrain
from conftest import FAULTS, run_cli

FSDP = ("dist.strategy=fsdp", "trainer.epochs=1", "dist.timeout_s=30", "logger.plots=false")


def assert_counted_once_as_in_one_process(run, split_size: int) -> None:
    one = dtrain.evaluate(run.dir / "checkpoints" / "latest", split="val")
    assert run.summary["val_samples"] == one["samples"] == split_size
    assert run.summary["val_loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert run.summary["val_acc"] == pytest.approx(one["acc"], abs=1e-9)


def test_two_fsdp_ranks_with_one_more_evaluation_batch_on_one_of_them_finish(tmp_path):
    # 1001 validation samples: rank 0 gets 501 (two batches of at most 500), rank 1 gets 500 (one batch)
    run = run_cli(tmp_path / "run", *FSDP, "data.val_fraction=0.1001", "trainer.max_steps=3", nproc=2, timeout=240)
    assert run.code == 0, run
    assert_counted_once_as_in_one_process(run, 1001)


@pytest.mark.slow
def test_three_fsdp_ranks_with_uneven_evaluation_shards_finish(tmp_path):
    # 1000 validation samples over 3 ranks: 334, 333, 333 in batches of 333: two batches on rank 0, one on the others
    run = run_cli(tmp_path / "run", *FSDP, "data.batch_size=66", "data.eval_batch_size=999", "trainer.max_steps=3",
                  nproc=3, timeout=300)
    assert run.code == 0, run
    assert_counted_once_as_in_one_process(run, 1000)


@pytest.mark.slow
def test_a_two_rank_fsdp_checkpoint_resumed_on_three_ranks_evaluates_and_finishes(tmp_path):
    common = (*FSDP, "data.batch_size=66", "trainer.max_steps=12", "checkpoint.every_n_steps=5")
    crashed = run_cli(tmp_path / "run", *common, "data.eval_batch_size=1000", nproc=2, timeout=300,
                      target=(FAULTS,), env={"DTRAIN_FAULT": "raise:0:7"})
    assert crashed.code != 0 and "injected failure at step 7" in crashed.err, crashed
    resumed = run_cli(tmp_path / "run", *common, "data.eval_batch_size=999", nproc=3, timeout=300)
    assert resumed.code == 0, resumed
    assert "resumed from" in resumed.out and "step 5" in resumed.out, resumed
    assert resumed.summary["steps"] == 12
    assert_counted_once_as_in_one_process(resumed, 1000)
