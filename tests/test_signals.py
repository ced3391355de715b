"""Signals as clusters send them: SLURM's scancel, `timeout`, systemd, container runtimes and a terminal's
Ctrl-C signal the whole process group, DataLoader workers included. The trainer saves and exits 75 (130
for Ctrl-C); its workers neither die of the signal nor act on it; the launcher's verdict is the workers'
own, never a guess from the files in the run folder."""

import signal

import pytest

from conftest import FAULTS, Live, write_image_folder

STREAMED = ("model=mlp", "data=imagefolder", "data.num_workers=2", "data.batch_size=4", "data.eval_batch_size=8",
            "data.image_size=16", "trainer.epochs=25", "trainer.log_every_n_steps=1", "logger.progress_bar=false",
            "logger.plots=false")


def streamed(tmp_path, *extra: str, launch: int = 0, fault: str = "") -> Live:
    data = write_image_folder(tmp_path / "images")
    overrides = (*STREAMED, f"data.root={data}", f"hydra.run.dir={tmp_path / 'run'}", *extra)
    if launch:
        target = (FAULTS, "--launch") if fault else ("-m", "dtrain.launch")
        overrides = (f"launcher.nproc_per_node={launch}", *overrides)
    else:
        target = (FAULTS,) if fault else ("-m", "dtrain")
    return Live(*target, *overrides, env={"DTRAIN_FAULT": fault} if fault else None)


def latest(tmp_path) -> int:
    return int((tmp_path / "run" / "checkpoints" / "latest").read_text().removeprefix("step-").removesuffix(".pt"))


def test_sigterm_to_the_process_group_saves_and_exits_75_although_data_loader_workers_got_it_too(tmp_path):
    job = streamed(tmp_path)
    job.wait_for(" step 3/")
    job.signal_group(signal.SIGTERM)
    assert job.finish() == 75, job
    assert "DataLoader worker" not in job.stderr and "Traceback" not in job.stderr, job
    assert job.stdout.count("stopped by SIGTERM after step") == 1, job
    assert latest(tmp_path) >= 3


def test_ctrl_c_to_the_process_group_says_so_once_and_saves(tmp_path):
    job = streamed(tmp_path)
    job.wait_for(" step 3/")
    job.signal_group(signal.SIGINT)
    assert job.finish() == 130, job
    assert job.stderr.count("Ctrl-C: stopping after this step") == 1, job  # not once more per worker
    assert "Traceback" not in job.stderr, job
    assert latest(tmp_path) >= 3


def test_sigusr1_to_the_process_group_saves_and_exits_75(tmp_path):
    job = streamed(tmp_path)  # SIGUSR1's default action would end a worker that does not ignore it
    job.wait_for(" step 3/")
    job.signal_group(signal.SIGUSR1)
    assert job.finish() == 75, job
    assert "DataLoader worker" not in job.stderr, job


@pytest.mark.slow
def test_the_launcher_signalled_as_a_group_stops_its_streaming_workers_with_a_checkpoint(tmp_path):
    job = streamed(tmp_path, launch=2)
    job.wait_for(" step 3/")
    job.signal_group(signal.SIGTERM)
    assert job.finish() == 75, job
    assert "DataLoader worker" not in job.stderr and "Traceback" not in job.stderr, job
    assert job.stdout.count("checkpoint saved; exiting with 75") == 1, job
    assert latest(tmp_path) >= 3


@pytest.mark.slow
def test_the_launcher_reports_workers_that_crashed_while_stopping_even_after_a_fresh_checkpoint(tmp_path):
    # Every step saves, so `latest` moves after the signal; the workers then crash instead of stopping.
    job = streamed(tmp_path, "checkpoint.every_n_steps=1", launch=2, fault="crashstop:0:0")
    job.wait_for(" step 3/")
    job.signal_group(signal.SIGTERM)
    assert job.finish() == 1, job
    assert "injected crash while stopping" in job.stderr, job


@pytest.mark.slow
def test_a_second_sigterm_to_the_launcher_lets_the_workers_finish_saving(tmp_path):
    job = streamed(tmp_path, launch=2)
    job.wait_for(" step 3/")
    job.signal_group(signal.SIGTERM)
    job.signal_group(signal.SIGTERM)  # a scheduler insisting is not a second Ctrl-C
    assert job.finish() == 75, job
    assert latest(tmp_path) >= 3


@pytest.mark.slow
def test_a_second_ctrl_c_to_the_launcher_stops_the_workers_at_once(tmp_path):
    job = streamed(tmp_path, "trainer.stop_grace_s=60", launch=2, fault="slowstop:0:0")
    job.wait_for(" step 3/")
    job.signal_group(signal.SIGINT)
    job.wait_for("Ctrl-C: stopping after this step")
    job.signal_group(signal.SIGINT)
    # At once: the stopping rank sleeps 30 s before its save, so a launcher that waited for the workers
    # would print their "checkpoint saved" (the generous finish() bound is only against a hang).
    assert job.finish() == 130, job
    assert "interrupted; the workers were stopped at once" in job.stderr, job
    assert "checkpoint saved" not in job.stdout, job


def test_a_second_ctrl_c_stops_at_once_without_waiting_for_the_checkpoint(tmp_path):
    job = streamed(tmp_path, fault="slowstop:0:0")  # saving on the stop takes 30 s
    job.wait_for(" step 3/")
    job.signal_group(signal.SIGINT)
    job.wait_for("Ctrl-C: stopping after this step")
    job.signal_group(signal.SIGINT)
    # At once: waiting for the 30 s save would end with "checkpoint saved" (finish() only bounds a hang).
    assert job.finish() == 130, job
    assert "dtrain: interrupted" in job.stderr and "checkpoint saved" not in job.stdout, job


def test_a_stop_that_cannot_finish_ends_after_stop_grace_s(tmp_path):
    job = streamed(tmp_path, "trainer.stop_grace_s=2", fault="slowstop:0:0")  # stuck for 30 s
    job.wait_for(" step 3/")
    job.signal_group(signal.SIGTERM)
    # The watchdog's verdict, 128 + SIGTERM: a stop left to finish its 30 s save would exit 75 after it.
    assert job.finish() == 128 + signal.SIGTERM, job
    assert "no clean stop within trainer.stop_grace_s=2s of SIGTERM" in job.stderr, job
    assert "checkpoint saved" not in job.stdout, job


def test_the_stop_watchdog_leaves_the_launcher_its_exit_unless_the_rank_already_left_its_own(tmp_path, monkeypatch):
    from dtrain import errors, signals

    def exit_(code):
        raise SystemExit(code)

    monkeypatch.setattr(signals.os, "_exit", exit_)
    monkeypatch.setattr(errors, "recorded", None)
    for key, value in {errors.EXIT_CODE_DIR: str(tmp_path), "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    stop = signals.StopSignal(60)
    try:
        with pytest.raises(SystemExit):  # stuck in a collective: the watchdog ends the rank
            stop._expire(signal.SIGTERM)
        assert errors.read_exit_codes(tmp_path) == {1: 128 + signal.SIGTERM}
        errors.record_exit_code(1)  # a rank that crashed, then hung tearing down its group
        with pytest.raises(SystemExit):
            stop._expire(signal.SIGTERM)
        assert errors.read_exit_codes(tmp_path) == {1: 1}  # its own verdict stands
    finally:
        stop.restore()


@pytest.mark.slow
def test_the_launcher_exits_128_plus_the_signal_when_the_workers_saved_nothing(tmp_path):
    job = streamed(tmp_path, "checkpoint.enabled=false", launch=2)
    job.wait_for(" step 3/")
    job.signal_group(signal.SIGTERM)
    assert job.finish() == 128 + signal.SIGTERM, job
    assert "nothing was saved" in job.stdout and "exiting with 75" not in job.stdout, job
