"""Streams: an IterableDataset read through torchdata's StatefulDataLoader, each rank and worker its own share,
its position saved in every checkpoint so a run resumes exactly, workers included; ranks whose shares end at
different steps stop together; what a stream cannot do is one line."""
import logging

import pytest
import torch

from conftest import ROOT, crash_after_step, make_trainer, run_cli
from dtrain.errors import ConfigError

JOB = ("data._target_=stream_data.stream", "data.name=stream", "model._target_=stream_data.Noting", "model.name=noting",
       "~model.dropout", "data.batch_size=8", "data.eval_batch_size=8", "trainer.epochs=2", "logger=none",
       "checkpoint.every_n_steps=5", "seed=1")


@pytest.fixture
def streams_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests"))


@pytest.mark.parametrize("stateful", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["with-its-own-state", "fast-forwarded"])
def test_a_stream_with_two_workers_resumes_exactly_after_a_crash(tmp_path, quiet_logs, monkeypatch,
                                                                 streams_importable, stateful):
    job = (*JOB, f"+data.stateful={stateful}", "data.num_workers=2")
    reference = make_trainer(tmp_path / "reference", *job)
    reference.fit()
    assert reference.progress.step == 2 * 26  # one pass of 203 items in batches of 8 (the last one short), twice
    restore = crash_after_step(monkeypatch, 33)  # mid-epoch 2; step 30 was saved
    with pytest.raises(RuntimeError, match="crash"):
        make_trainer(tmp_path / "run", *job).fit()
    restore()
    resumed = make_trainer(tmp_path / "run", *job)
    resumed.fit()
    assert resumed.progress.step == reference.progress.step
    for (name, a), b in zip(reference.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


def test_a_run_that_ends_or_raises_ends_its_data_workers_with_it(tmp_path, quiet_logs, monkeypatch,
                                                                   streams_importable):
    """Not left to garbage collection, which may close a loader's queues before it asks its workers to stop:
    each worker then waited out PyTorch's 5 s poll, 20 s at the end of this run."""
    import multiprocessing
    job = (*JOB, "+data.stateful=true", "data.num_workers=2", "trainer.epochs=1")
    finished = make_trainer(tmp_path / "finished", *job)
    finished.fit()
    assert multiprocessing.active_children()  # persistent workers, kept between epochs
    finished.close()
    assert multiprocessing.active_children() == []
    restore = crash_after_step(monkeypatch, 3)
    crashed = make_trainer(tmp_path / "crashed", *job)
    with pytest.raises(RuntimeError, match="crash"):
        crashed.fit()
    restore()
    crashed.close()  # as dtrain's own runs close theirs, in a finally
    assert multiprocessing.active_children() == []


@pytest.mark.slow
def test_two_ranks_with_two_workers_each_train_on_no_item_twice_and_end_together(tmp_path):
    ids = tmp_path / "ids"
    ids.mkdir()
    run = run_cli(tmp_path / "run", *JOB, "data.num_workers=2", "trainer.epochs=1", nproc=2, timeout=300,
                  env={"PYTHONPATH": str(ROOT / "tests"), "DTRAIN_IDS_DIR": str(ids)})
    assert run.code == 0, run
    seen = [int(i) for r in (0, 1) for i in (ids / f"ids-rank{r}.txt").read_text().split()]
    assert len(seen) == len(set(seen))  # no item twice, across ranks and workers
    # 203 items in 4 shares of 51, 51, 51, 50, batches of 4 per rank: the ranks stop at the first rank's end
    assert set(seen) <= set(range(203)) and len(seen) > 180


@pytest.mark.slow
def test_an_endless_stream_needs_max_steps_and_one_without_val_is_not_validated(tmp_path, quiet_logs,
                                                                               streams_importable, caplog):
    with pytest.raises(ConfigError, match="the stream has no end that dtrain can know .* set trainer.max_steps"):
        make_trainer(tmp_path / "a", *JOB, "+data.n=0")
    dtrain_log = logging.getLogger("dtrain")  # dtrain's logger does not propagate to the root's
    dtrain_log.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="dtrain")
    try:
        t = make_trainer(tmp_path / "b", *JOB, "+data.n=0", "+data.val=false", "trainer.max_steps=7")
        summary = t.fit()
    finally:
        dtrain_log.removeHandler(caplog.handler)
    assert summary["steps"] == 7 and "val_loss" not in summary
    assert "validation is skipped" in caplog.text
