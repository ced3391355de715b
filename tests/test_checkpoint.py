"""Checkpoints are a contract: complete or absent, weights-only, and enough to resume exactly.
Faults (a killed rank, a kill mid-write, preemption signals, a full disk) lose nothing."""

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dtrain import checkpoint as ckpt
from dtrain import optim
from dtrain import stopping
from dtrain.errors import EXIT_PREEMPTED as PREEMPTED_EXIT_CODE
from dtrain.errors import Preempted
from conftest import (CHILD_ENV, FAULTS, Run, assert_same_weights, crash_after_step, final_state, make_trainer,
                      params, run_cli)

SMALL = ("model=mlp3", "data=synthetic", "data.shape=[1,12,12]", "data.num_samples=1001",
         "data.batch_size=32", "data.eval_batch_size=64", "optim=adam", "sched=cosine", "trainer.epochs=3",
         "seed=5", "checkpoint.every_n_steps=10")
STEPS = 3 * (801 // 32)  # 75 optimizer steps


def without_timing(metrics: list[dict]) -> list[dict]:
    from dtrain.perf import TIMINGS
    return [{k: v for k, v in m.items() if k not in TIMINGS} for m in metrics]


def checkpoint_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


# -- the file contract, in-process ----------------------------------------------------------------

def test_a_checkpoint_holds_everything_a_resume_needs_and_loads_weights_only(tmp_path, quiet_logs):
    t = make_trainer(tmp_path, *SMALL, "trainer.max_steps=10")
    t.fit()
    state = torch.load(tmp_path / "checkpoints" / "step-00000010.pt", weights_only=True)
    # What the checkpoint is, then its Stateful parts by name (dtrain/stateful.py)
    for key in ("format", "step", "model_name", "config", "data", "world_size", "best",
                "model", "optimizer", "scheduler", "scaler", "progress", "callbacks", "logger", "ranks"):
        assert key in state, key
    assert (state["step"], state["format"]) == (10, ckpt.FORMAT_VERSION)
    assert state["progress"] == {"epoch": 0, "step": 10, "samples_in_epoch": 320}
    assert state["ranks"]["world_size"] == 1 and set(state["ranks"]["ranks"][0]["rng"]) >= {"python", "numpy", "torch"}
    assert state["config"]["model"]["name"] == "mlp3" and "module." not in next(iter(state["model"]))
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000010.pt"


def test_keep_last_prunes_old_checkpoints_and_best_is_kept_apart(tmp_path, quiet_logs):
    t = make_trainer(tmp_path, *SMALL, "checkpoint.keep_last=2")
    t.fit()
    names = checkpoint_files(tmp_path)
    assert names == ["best.pt", "latest", "step-00000070.pt", "step-00000075.pt"]
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    t.close()
    epochs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    top = max(epochs, key=lambda m: m["val_acc"])  # the first epoch that reached the highest val_acc
    assert (best["step"], best["best"]) == (top["step"], top["val_acc"])


@pytest.mark.unit
def test_a_failed_write_leaves_no_partial_file_and_does_not_move_latest(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    ckpt.save(folder, {"model": {"w": torch.ones(2)}}, step=1, keep_last=3, is_best=False)
    good = (folder / "step-00000001.pt").read_bytes()

    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(ckpt.CheckpointError,
                       match="No space left on device; the checkpoints already there are untouched"):
        ckpt.save(folder, {"model": {"w": torch.zeros(2)}}, step=2, keep_last=3, is_best=True)
    assert checkpoint_files(tmp_path) == ["latest", "step-00000001.pt"]
    assert (folder / "latest").read_text() == "step-00000001.pt"
    assert (folder / "step-00000001.pt").read_bytes() == good


def complete_state(step: int) -> dict:
    """The smallest state `ckpt.load` accepts as a dtrain checkpoint."""
    return {"model": {"w": torch.full((2,), float(step))}, "optimizer": {}, "scheduler": {}, "scaler": {},
            "progress": {"epoch": 0, "step": step, "samples_in_epoch": 0}, "step": step, "model_name": "mlp",
            "config": {}, "ranks": {"world_size": 1, "ranks": []}, "world_size": 1}


@pytest.mark.unit
def test_a_format_2_checkpoint_is_read_as_format_3(tmp_path):
    old = {"format": 2, "model": {"w": torch.ones(2)}, "optimizer": {}, "scheduler": {}, "scaler": {}, "epoch": 1,
           "step": 7, "samples_in_epoch": 64, "model_name": "mlp", "config": {}, "ranks": [{"rng": {}}],
           "world_size": 1, "metrics": {"train_loss": 0.5}, "logger": {"wandb_run_id": "abc"},
           "early_stopping": {"best": 0.9, "bad": 1}}
    torch.save(old, tmp_path / "old.pt")
    state = ckpt.load(tmp_path / "old.pt")
    assert state["format"] == ckpt.FORMAT_VERSION and state["step"] == 7
    assert state["progress"] == {"epoch": 1, "step": 7, "samples_in_epoch": 64}
    assert state["ranks"] == {"world_size": 1, "ranks": [{"rng": {}}]}
    assert state["logger"] == {"wandb_run_id": "abc", "last_epoch": {"train_loss": 0.5}}
    assert state["callbacks"] == {"early_stopping": {"best": 0.9, "bad": 1}}


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {Payload.marker}",))


@pytest.mark.unit
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_never_runs(tmp_path):
    Payload.marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": 1, "model": Payload()}, evil)
    with pytest.raises(ckpt.CheckpointError, match="was refused: it holds objects other than tensors"):
        ckpt.load(evil)
    assert not Payload.marker.exists()
    pickled = tmp_path / "plain.pt"  # a bare pickle, not even torch's format
    pickled.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load(pickled)
    assert not Payload.marker.exists()


def test_resuming_from_a_malicious_file_exits_with_one_clear_line(tmp_path):
    Payload.marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": 1, "model": Payload()}, evil)
    run = run_cli(tmp_path / "run", f"resume={evil}", "trainer.epochs=1")
    assert run.code == 2, run
    assert f"checkpoint {evil} was refused" in run.err and "Traceback" not in run.err, run
    assert not Payload.marker.exists()


@pytest.mark.unit
def test_a_truncated_newest_checkpoint_is_set_aside_with_a_warning_and_the_previous_one_used(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    for step in (1, 2):
        ckpt.save(folder, complete_state(step), step=step, keep_last=5, is_best=False)
    good = (folder / "step-00000001.pt").read_bytes()
    newest = folder / "step-00000002.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    (folder / ".step-00000003.pt.tmp-999").write_bytes(b"half")  # a write that was killed
    path, state = ckpt.find_resumable(folder)
    assert path.name == "step-00000001.pt" and state["model"]["w"][0] == 1.0
    assert "step-00000002.pt is corrupt, truncated or not a checkpoint" in caplog.text
    assert checkpoint_files(tmp_path) == ["latest", "step-00000001.pt", "step-00000002.pt.corrupt"]
    assert (folder / "step-00000001.pt").read_bytes() == good


def test_a_checkpoint_of_another_model_is_a_clear_error(tmp_path, quiet_logs):
    make_trainer(tmp_path / "a", *SMALL, "trainer.max_steps=2").fit()
    other = make_trainer(tmp_path / "b", *SMALL, "model=mlp", f"resume={tmp_path}/a/checkpoints/step-00000002.pt")
    with pytest.raises(ckpt.CheckpointError, match="holds model=mlp3 but the config asks for model=mlp"):
        other.fit()


def test_resume_none_starts_fresh_even_beside_checkpoints(tmp_path, quiet_logs):
    make_trainer(tmp_path, *SMALL, "trainer.max_steps=10").fit()
    fresh = make_trainer(tmp_path, *SMALL, "trainer.max_steps=10", "resume=none")
    assert fresh.checkpointer.resume(fresh.saved, "none") is None and fresh.progress.step == 0
    assert fresh.checkpointer.resume(fresh.saved, "auto")["step"] == 10 and fresh.progress.step == 10


@pytest.mark.parametrize("fmt", ["file", "dcp"])
def test_a_resume_runs_the_configured_optimizer_implementation_not_the_checkpoints(tmp_path, quiet_logs,
                                                                                    monkeypatch, fmt):
    restore = crash_after_step(monkeypatch, 12)
    saved = make_trainer(tmp_path, *SMALL, "optim.implementation=loop", f"checkpoint.format={fmt}")
    with pytest.raises(RuntimeError, match="crash"):
        saved.fit()  # saved at step 10
    saved.close()
    restore()
    resumed = make_trainer(tmp_path, *SMALL, f"checkpoint.format={fmt}")  # optim.implementation=auto: fused
    resumed.checkpointer.resume(resumed.saved, "auto")  # an operational key: not refused as a change
    assert resumed.progress.step == 10
    assert optim.implementation_of(resumed.optimizer) == "fused"
    assert all(g["fused"] and not g["foreach"] for g in resumed.optimizer.param_groups)
    resumed.close()


# -- exact resume ---------------------------------------------------------------------------------

def test_a_run_stopped_mid_epoch_and_resumed_ends_exactly_like_an_uninterrupted_one(tmp_path, quiet_logs, monkeypatch):
    whole = make_trainer(tmp_path / "whole", *SMALL)
    whole.fit()
    whole.close()

    restore = crash_after_step(monkeypatch, 37)
    first = make_trainer(tmp_path / "split", *SMALL)
    with pytest.raises(RuntimeError, match="crash"):
        first.fit()
    first.close()
    restore()
    resumed = make_trainer(tmp_path / "split", *SMALL)  # resume=auto finds step 30, mid-epoch 1
    resumed.fit()
    resumed.close()

    a, b = params(whole.model), params(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    def read(d):
        return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]

    assert without_timing(read(tmp_path / "split")) == without_timing(read(tmp_path / "whole"))


@pytest.fixture(scope="module")
def two_rank_reference(tmp_path_factory):
    """The uninterrupted 2-rank run the fault tests compare against."""
    run = run_cli(tmp_path_factory.mktemp("reference") / "run", *SMALL, nproc=2)
    assert run.code == 0, run
    return run


@pytest.mark.slow
def test_a_rank_killed_with_sigkill_is_restarted_by_torchrun_and_the_run_ends_as_if_never_killed(tmp_path,
                                                                                                  two_rank_reference):
    # The default run folder (runs/<name>/<torchrun launch time>) must survive torchrun's restart.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=2",
           FAULTS, *SMALL]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**CHILD_ENV, "DTRAIN_FAULT": "kill:1:45"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    folders = list((tmp_path / "runs" / "mlp3-synthetic").iterdir())
    assert len(folders) == 1, folders
    run = Run(subprocess.CompletedProcess([], 0, proc.stdout, proc.stderr), folders[0])
    assert "resumed from" in proc.stdout and "step-00000040.pt" in proc.stdout
    assert_same_weights(final_state(two_rank_reference), final_state(run), rtol=0, atol=0)
    assert without_timing(run.metrics) == without_timing(two_rank_reference.metrics)


@pytest.mark.slow
def test_a_kill_in_the_middle_of_writing_a_checkpoint_keeps_the_previous_one_and_resume_works(tmp_path,
                                                                                               two_rank_reference):
    run = run_cli(tmp_path / "run", *SMALL, nproc=2, target=(FAULTS,), env={"DTRAIN_FAULT": "killsave:0:40"},
                  launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "--max-restarts=1"], timeout=300)
    assert run.code == 0, run
    assert "resumed from" in run.out and "step-00000030.pt" in run.out  # the half-written 40 never counted
    assert not list((run.dir / "checkpoints").glob(".*tmp*"))
    assert_same_weights(final_state(two_rank_reference), final_state(run), rtol=0, atol=0)


def test_sigterm_saves_a_checkpoint_at_the_current_step_and_exits_75(tmp_path):
    run = run_cli(tmp_path / "run", *SMALL, target=(FAULTS,), env={"DTRAIN_FAULT": "term:0:23"})
    assert run.code == PREEMPTED_EXIT_CODE, run
    assert (run.dir / "checkpoints" / "latest").read_text() == "step-00000023.pt"
    resumed = run_cli(tmp_path / "run", *SMALL)
    assert resumed.code == 0, resumed
    assert resumed.summary["steps"] == STEPS


@pytest.mark.slow
# Ranks agree on a stop every trainer.sync_every_n_steps (10): the first agreement after step 23 is 30;
# agreeing every step, the run stops after step 23 itself.
@pytest.mark.parametrize("every,stopped_at", [(10, 30), (1, 23)])
def test_sigusr1_on_one_rank_stops_every_rank_after_the_same_step_and_the_resume_is_exact(tmp_path, two_rank_reference,
                                                                                          every, stopped_at):
    config = (*SMALL, f"trainer.sync_every_n_steps={every}")
    run = run_cli(tmp_path / "run", *config, nproc=2, target=(FAULTS,), env={"DTRAIN_FAULT": "usr1:1:23"})
    assert run.code != 0, run
    assert (run.dir / "checkpoints" / "latest").read_text() == f"step-{stopped_at:08d}.pt"
    assert f"exiting with {PREEMPTED_EXIT_CODE}" in run.out
    resumed = run_cli(tmp_path / "run", *config, nproc=2)
    assert resumed.code == 0, resumed
    assert_same_weights(final_state(two_rank_reference), final_state(resumed), rtol=0, atol=0)
    assert without_timing(resumed.metrics) == without_timing(two_rank_reference.metrics)


def no_failed_save() -> None:
    raise AssertionError("no rank's background save failed")


@pytest.mark.unit
def test_a_vote_that_carries_a_failed_background_save_reports_it_on_every_rank(monkeypatch):
    from dtrain import world as w
    from dtrain.errors import CheckpointError
    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(w, "start_max_over_ranks", lambda value, device: lambda: stopping.SAVE_FAILED)  # another's

    def report():
        raise CheckpointError("could not write the checkpoint of step 30")
    vote = stopping.StopVote(w.World(world_size=2), model, report)
    vote.start(0, save_failed=False)  # this rank's save went well; another rank's did not
    with pytest.raises(CheckpointError, match="step 30"):
        vote.settle()
    alone = stopping.StopVote(w.World(), model, report)
    with pytest.raises(CheckpointError):
        alone.start(0, save_failed=True)


# Under DDP the ranks' vote on a stop, started after step kN, is read in step kN+1 after its backward. A stop
# then undoes what that forward and backward changed which a checkpoint holds: training stops after step kN.
@pytest.mark.unit
def test_a_stop_agreed_in_the_next_step_undoes_its_random_draws_and_buffer_updates(monkeypatch):
    from dtrain import world as w
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5)).train()
    monkeypatch.setattr(w, "start_max_over_ranks", lambda value, device: lambda: signal.SIGUSR1)  # another rank's
    vote = stopping.StopVote(w.World(world_size=2), model, no_failed_save)
    rng, buffers = ckpt.rng_state(), {k: v.clone() for k, v in model.state_dict().items()}
    vote.start(0)  # after step kN; this rank saw no signal
    model(torch.randn(8, 4))  # step kN+1's forward: random draws, running statistics
    with pytest.raises(Preempted) as stopped:
        vote.settle()
    assert stopped.value.code == PREEMPTED_EXIT_CODE
    assert torch.equal(torch.get_rng_state(), rng["torch"]) and random.getstate() == rng["python"]
    assert_same_weights(dict(model.state_dict()), buffers, rtol=0, atol=0)
    vote.settle()  # read once: nothing in flight any more


@pytest.mark.unit
def test_a_vote_without_a_stop_keeps_the_step_and_alone_a_signal_stops_at_once(monkeypatch):
    from dtrain import world as w
    model = torch.nn.BatchNorm1d(4).train()
    monkeypatch.setattr(w, "start_max_over_ranks", lambda value, device: lambda: value)
    vote = stopping.StopVote(w.World(world_size=2), model, no_failed_save)
    vote.start(0)
    model(torch.randn(8, 4))
    vote.settle()
    assert int(model.num_batches_tracked) == 1
    alone = stopping.StopVote(w.World(), model, no_failed_save)
    with pytest.raises(Preempted) as stopped:
        alone.start(signal.SIGINT)
    assert stopped.value.code == 130 and alone.pending is None


@pytest.mark.slow
# Stopped after step 30 and resumed to step 40. Saving every 10 steps, step 30 was saved before the vote was
# read (and is not written twice; asynchronously, its copy ran beside step 31's forward); every 7, the stop
# writes it after the undone step 31's forward and backward.
@pytest.mark.parametrize("save", [("checkpoint.every_n_steps=10",), ("checkpoint.every_n_steps=7",),
                                  ("checkpoint.every_n_steps=10", "checkpoint.format=dcp",
                                   "checkpoint.async_save=true")],
                         ids=["saved-at-30", "saved-by-the-stop", "saved-at-30-async"])
def test_a_stop_on_two_ranks_resumes_exactly_with_batch_norm_and_dropout(tmp_path, save):
    config = (*SMALL, "model=convnet", "model.dropout=0.3", "trainer.max_steps=40", *save)
    reference = run_cli(tmp_path / "reference", *config, nproc=2)
    assert reference.code == 0, reference
    run = run_cli(tmp_path / "run", *config, nproc=2, target=(FAULTS,), env={"DTRAIN_FAULT": "usr1:1:23"})
    assert run.code != 0 and f"exiting with {PREEMPTED_EXIT_CODE}" in run.out, run
    assert "stopped by SIGUSR1 after step 30: checkpoint saved" in run.out, run
    assert run.out.count("step-00000030") == 1, run
    resumed = run_cli(tmp_path / "run", *config, nproc=2)
    assert resumed.code == 0 and "step-00000030" in resumed.out, resumed
    latest = [ckpt.weights(ckpt.load(r.dir / "checkpoints" / "latest")) for r in (reference, resumed)]
    assert_same_weights(*latest, rtol=0, atol=0)
    assert without_timing(resumed.metrics) == without_timing(reference.metrics)


@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_on_one_rank_from_the_saved_position(tmp_path, two_rank_reference):
    first = run_cli(tmp_path / "run", *SMALL, nproc=2, target=(FAULTS,), env={"DTRAIN_FAULT": "raise:1:45"})
    assert first.code != 0
    resumed = run_cli(tmp_path / "run", *SMALL)  # 1 rank continues from step 40, mid-epoch 1
    assert resumed.code == 0, resumed
    assert "re-seeded" in resumed.err or "re-seeded" in resumed.out
    assert_same_weights(final_state(two_rank_reference), final_state(resumed))


@pytest.mark.slow
@pytest.mark.parametrize("saved,resumed", [(2, 4), (4, 2)])
def test_a_checkpoint_resumed_on_another_world_size_continues_the_same_training(tmp_path, two_rank_reference,
                                                                               saved, resumed):
    # Stopped mid-epoch 1 at step 40 (the step-45 failure falls back to it). Any rank training other samples,
    # weights or optimizer state than the uninterrupted run would be far beyond float tolerance here.
    first = run_cli(tmp_path / "run", *SMALL, nproc=saved, target=(FAULTS,), env={"DTRAIN_FAULT": "raise:1:45"},
                    timeout=300)
    assert first.code != 0
    run = run_cli(tmp_path / "run", *SMALL, nproc=resumed, timeout=300)
    assert run.code == 0, run
    assert "resumed from" in run.out and "step-00000040.pt" in run.out, run
    assert_same_weights(final_state(two_rank_reference), final_state(run))
    assert run.summary["val_loss"] == pytest.approx(two_rank_reference.summary["val_loss"], abs=1e-6)


def can_mount_tmpfs() -> bool:
    probe = Path("/tmp/dtrain-tmpfs-probe")
    probe.mkdir(exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)]
    ok = subprocess.run(mount, capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(probe)])
    return ok


@pytest.mark.skipif(shutil.which("mount") is None or not can_mount_tmpfs(), reason="needs root to mount a small tmpfs")
def test_a_full_disk_stops_with_a_clear_error_and_the_checkpoint_already_there_intact(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    # Room for one MLP checkpoint (weights + Adam moments, ~1.2 MB) and the logs, not for a second one.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=True)
    try:
        run = run_cli(disk / "run", "trainer.epochs=3")
        assert run.code == 2, run
        assert "could not write a checkpoint" in run.err and "No space left on device" in run.err, run
        assert "the checkpoints already there are untouched" in run.err
        folder = disk / "run" / "checkpoints"
        assert (folder / "latest").read_text() == "step-00000140.pt"
        assert ckpt.load(folder / "step-00000140.pt")["step"] == 140
        assert not list(folder.glob(".*tmp*"))
    finally:
        subprocess.run(["umount", str(disk)])
