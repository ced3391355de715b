"""Nothing lost, nothing mixed: dtrain removes only what it created, one job owns a run folder, every bad
checkpoint or data file is one clear error, a stopped run says how to continue, and signals save."""

import builtins
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from dtrain import checkpoint as ckpt
from dtrain.rundir import RunFolderError
from conftest import CHILD_ENV, FAULTS, ROOT, Live, make_trainer, run_cli
from test_data import write_idx, write_mnist

SMALL = ("model=mlp3", "data=synthetic", "data.shape=[1,12,12]", "data.num_samples=1001",
         "data.batch_size=32", "data.eval_batch_size=64", "optim=adam", "trainer.epochs=3", "seed=5",
         "checkpoint.every_n_steps=10")


def dtrain(cwd: Path, *overrides: str, env: dict | None = None, target=("-m", "dtrain"), timeout: float = 240):
    """`python -m dtrain` (or the fault wrapper) in `cwd` with the default run folder."""
    return subprocess.run([sys.executable, *target, *overrides], cwd=cwd, env={**CHILD_ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- the run folder is owned, and only what dtrain made is ever removed -----------------------------

def test_bad_input_never_removes_a_folder_or_file_dtrain_did_not_create(tmp_path):
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "src" / "main.py").write_text("x\n")
    for bad in ("data.batch_size=0",  # refused before anything is written
                "data.batch_size=64"):  # refused after the run folder was locked and config/log written
        proc = dtrain(proj, "hydra.run.dir=.", "data=mnist", bad, f"data.root={tmp_path / 'empty'}",
                      "data.download=false")
        assert proc.returncode == 2, proc.stderr
        assert sorted(p.name for p in proj.rglob("*")) == ["main.py", "src"], list(proj.rglob("*"))


def test_bad_input_removes_the_empty_folders_hydra_made_and_keeps_the_ones_that_were_there(tmp_path):
    (tmp_path / "data").mkdir()
    proc = dtrain(tmp_path, "data=mnist", f"data.root={tmp_path / 'data'}", "data.download=false")
    assert proc.returncode == 2 and "MNIST/raw" in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    dtrain(tmp_path, "data=mnist", f"data.root={tmp_path / 'data'}", "data.download=false")
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["mine"]


def test_two_runs_started_together_get_a_folder_each(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-m", "dtrain", "debug=fast"], cwd=tmp_path, env=CHILD_ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    folders = list((tmp_path / "runs" / "mlp-mnist_sample").iterdir())
    assert len(folders) == 2 and all((f / "summary.json").exists() for f in folders), folders


def test_a_second_job_aimed_at_a_live_runs_folder_is_refused_and_a_dead_holder_is_taken_over(tmp_path):
    run = tmp_path / "run"
    live = subprocess.Popen([sys.executable, FAULTS, *SMALL, f"hydra.run.dir={run}"], cwd=ROOT,
                            env={**CHILD_ENV, "DTRAIN_FAULT": "hang:0:12"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "latest").exists():  # it hangs after step 12, holding the folder
            assert time.monotonic() < deadline and live.poll() is None
            time.sleep(0.2)
        before = tree(run)
        second = run_cli(run, *SMALL)
        assert second.code == 2, second
        assert f"run folder {run} is in use by another dtrain job (host " in second.err
        assert f"pid {live.pid} " in second.err and len(second.err.strip().splitlines()) == 1, second
        assert tree(run) == before  # not a byte of the live run's folder changed
    finally:
        live.kill()
        live.wait()
    third = run_cli(run, *SMALL)
    assert third.code == 0, third
    assert "taking over from a job that ended without releasing it" in third.out
    assert "resumed from" in third.out and third.summary["steps"] == 75


# -- every unreadable or foreign checkpoint is the one clear error ---------------------------------

def bad_files(tmp_path: Path, good: bytes) -> dict[str, Path]:
    """A corpus of files that are not usable dtrain checkpoints."""
    out = {}

    def put(name: str, data: bytes) -> None:
        out[name] = tmp_path / name
        out[name].write_bytes(data)

    rng = np.random.default_rng(0)
    for i, n in enumerate((1, 100, 5000)):
        put(f"random{i}", rng.integers(0, 256, n, dtype=np.uint8).tobytes())
    put("text", b"step-00000010.pt\n")
    put("empty", b"")
    for cut in sorted({1, 4, 30, 100, 1000, len(good) // 3, len(good) // 2, len(good) - 100, len(good) - 1}):
        put(f"truncated-{cut}", good[:cut])
    buf = io.BytesIO()
    zipfile.ZipFile(buf, "w").close()
    put("empty-zip", buf.getvalue())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/readme.txt", "no pickle here")
    put("zip-without-pickle", buf.getvalue())
    for name, obj in {"list": [1, 2], "int": 7, "string": "model", "tensor": torch.ones(3)}.items():
        buf = io.BytesIO()
        torch.save(obj, buf)
        put(f"pickled-{name}", buf.getvalue())
    state = torch.load(io.BytesIO(good), weights_only=True)
    for key in ("model", "optimizer", "config", "ranks", "step"):
        buf = io.BytesIO()
        torch.save({k: v for k, v in state.items() if k != key}, buf)
        put(f"missing-{key}", buf.getvalue())
    buf = io.BytesIO()
    torch.save({**state, "model": "weights"}, buf)
    put("malformed-model", buf.getvalue())
    buf = io.BytesIO()
    torch.save({**state, "format": 1}, buf)
    put("old-format", buf.getvalue())
    put("bare-pickle", pickle.dumps({"format": 2}))
    (tmp_path / "a-folder").mkdir()
    out["a-folder"] = tmp_path / "a-folder"
    return out


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_every_unreadable_or_foreign_file_is_a_checkpoint_error_naming_it(tmp_path, quiet_logs):
    make_trainer(tmp_path / "run", *SMALL, "trainer.max_steps=10").fit()
    good = (tmp_path / "run" / "checkpoints" / "step-00000010.pt").read_bytes()
    corpus = bad_files(tmp_path, good)
    assert len(corpus) >= 25
    for name, path in corpus.items():
        with pytest.raises(ckpt.CheckpointError) as err:
            ckpt.load(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value), name


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_corrupt_newest_checkpoint_of_any_kind_is_set_aside_and_the_previous_one_used(tmp_path, quiet_logs):
    make_trainer(tmp_path / "run", *SMALL, "trainer.max_steps=20", "checkpoint.keep_last=5").fit()
    folder = tmp_path / "run" / "checkpoints"
    corpus = bad_files(tmp_path, (folder / "step-00000020.pt").read_bytes())
    for name, bad in corpus.items():
        if bad.is_dir():
            continue
        (folder / "step-00000030.pt").write_bytes(bad.read_bytes())
        (folder / "latest").write_bytes(b"\xff\xfe garbage")  # even the pointer is unreadable
        path, state = ckpt.find_resumable(folder)
        assert (path.name, state["step"]) == ("step-00000020.pt", 20), name
        assert (folder / "step-00000030.pt.corrupt").read_bytes() == bad.read_bytes()
        (folder / "step-00000030.pt.corrupt").unlink()


@pytest.mark.slow
def test_resume_from_a_text_file_is_one_line_and_from_latest_follows_the_pointer(tmp_path):
    first = run_cli(tmp_path / "a", *SMALL, "trainer.max_steps=20")
    assert first.code == 0, first
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    bad = run_cli(tmp_path / "b", *SMALL, f"resume={text}")
    assert bad.code == 2 and len(bad.err.strip().splitlines()) == 1, bad
    assert f"checkpoint {text} is corrupt, truncated or not a checkpoint" in bad.err
    folder = run_cli(tmp_path / "c", *SMALL, f"resume={first.dir / 'checkpoints'}")
    assert folder.code == 2 and len(folder.err.strip().splitlines()) == 1, folder
    assert "is a folder but not a complete distributed checkpoint" in folder.err, folder
    latest = run_cli(tmp_path / "d", *SMALL, "trainer.max_steps=30", "checkpoint.allow_config_change=true",
                     f"resume={first.dir / 'checkpoints' / 'latest'}")
    assert latest.code == 0 and "step-00000020.pt: step 20, in epoch 1" in latest.out, latest


# -- resuming continues the same run, never a different one under the same record -------------------

@pytest.mark.slow
def test_a_resume_with_other_training_values_is_refused_naming_them_unless_allowed_and_recorded(tmp_path):
    first = run_cli(tmp_path / "run", *SMALL, "trainer.max_steps=20")
    assert first.code == 0, first
    original = (first.dir / "config.yaml").read_text()
    refused = run_cli(tmp_path / "run", *SMALL, "trainer.max_steps=40", "optim.lr=0.01")
    assert refused.code == 2 and len(refused.err.strip().splitlines()) == 1, refused
    assert "was trained with other values: optim.lr=0.001 -> 0.01, trainer.max_steps=20 -> 40" in refused.err
    assert "summary.json" in os.listdir(first.dir)  # the folder and its results are kept
    allowed = run_cli(tmp_path / "run", *SMALL, "trainer.max_steps=40", "checkpoint.allow_config_change=true")
    assert allowed.code == 0 and allowed.summary["steps"] == 40, allowed
    change = json.loads((first.dir / "config-changes.jsonl").read_text())
    assert change["changes"] == {"trainer.max_steps": [20, 40]} and change["checkpoint"].endswith("step-00000020.pt")
    assert (first.dir / "config.yaml").read_text() == original  # the record of the first run is never rewritten
    moved = run_cli(tmp_path / "run", *SMALL, "trainer.max_steps=40", "data.num_workers=1",
                    "trainer.log_every_n_steps=5")
    assert moved.code == 0, moved  # how a run executes may change freely


# -- stopping: signals save, say how to continue, and continuing works -----------------------------

def test_ctrl_c_saves_a_checkpoint_exits_130_and_resume_last_continues_the_same_run(tmp_path):
    stopped = dtrain(tmp_path, *SMALL, target=(FAULTS,), env={"DTRAIN_FAULT": "int:0:23"})
    assert stopped.returncode == 130, stopped.stderr
    assert "Traceback" not in stopped.stderr
    [folder] = (tmp_path / "runs" / "mlp3-synthetic").iterdir()
    assert (folder / "checkpoints" / "latest").read_text() == "step-00000023.pt"
    assert f"stopped by SIGINT after step 23: checkpoint saved; exiting with 130. To continue, run the same " \
           f"command with resume=last (the newest run of this config) or hydra.run.dir={folder}" in stopped.stdout
    resumed = dtrain(tmp_path, *SMALL, "resume=last")
    assert resumed.returncode == 0, resumed.stderr
    assert list((tmp_path / "runs" / "mlp3-synthetic").iterdir()) == [folder]
    assert "resumed from" in resumed.stdout and json.loads((folder / "summary.json").read_text())["steps"] == 75


def test_a_signal_with_checkpointing_off_saves_nothing_and_promises_no_resume(tmp_path):
    run = run_cli(tmp_path / "run", *SMALL, "checkpoint.enabled=false", target=(FAULTS,),
                  env={"DTRAIN_FAULT": "term:0:23"})
    assert run.code == 128 + signal.SIGTERM, run
    assert "checkpointing is off" in run.out and "nothing was saved" in run.out and "resume" not in run.out
    assert not (run.dir / "checkpoints").exists()


@pytest.mark.slow
def test_rank_0_names_the_signal_another_rank_received(tmp_path):
    run = run_cli(tmp_path / "run", *SMALL, nproc=2, target=(FAULTS,), env={"DTRAIN_FAULT": "usr1:1:23"})
    # Ranks agree on a stop every trainer.sync_every_n_steps (10): the first agreement after step 23 is 30.
    assert "stopped by SIGUSR1 after step 30: checkpoint saved; exiting with 75" in run.out, run
    assert (run.dir / "checkpoints" / "latest").read_text() == "step-00000030.pt"


# -- bad data files and a full disk ------------------------------------------------------------------

def test_an_idx_file_with_a_garbage_header_is_a_data_error_naming_it(tmp_path):
    write_mnist(tmp_path / "data")
    images = tmp_path / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(b"GARBAGE!" + images.read_bytes()[8:])
    run = run_cli(tmp_path / "run", "data=mnist", f"data.root={tmp_path / 'data'}", "data.download=false")
    assert run.code == 2 and "Traceback" not in run.err, run
    assert f"{images} is not an MNIST IDX file of 3 dimension(s)" in run.err
    assert not run.dir.exists()


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_a_corrupt_image_in_an_image_folder_is_one_line_naming_it(tmp_path, workers):
    from conftest import write_image_folder
    root = write_image_folder(tmp_path / "images", per_class=6)
    bad = root / "train" / "dog" / "3.png"
    bad.write_bytes(bad.read_bytes()[:60])  # a truncated PNG, as a broken copy leaves it
    run = run_cli(tmp_path / "run", "data=imagefolder", f"data.root={root}", f"data.num_workers={workers}",
                  "data.batch_size=4", "data.eval_batch_size=4", "data.image_size=16", "trainer.epochs=1",
                  "data.loader=stream")
    assert run.code == 2, run
    assert f"data=imagefolder: {bad} is not a readable image" in run.err, run
    assert "Traceback" not in run.err and run.err.count("\n") == 1, run


def test_a_run_folder_that_cannot_be_made_is_one_line_and_leaves_nothing(tmp_path):
    (tmp_path / "afile").write_text("mine")
    for where in ("afile", "afile/sub"):
        run = dtrain(tmp_path, f"hydra.run.dir={tmp_path / where}")
        assert run.returncode == 2 and f"{tmp_path / 'afile'} is a file, not a folder" in run.stderr, run.stderr
        assert run.stderr.count("\n") == 1
    run = dtrain(tmp_path, "name=" + "x" * 300)
    assert run.returncode == 2 and "more than this file system allows (255); choose a shorter name=" in run.stderr
    assert run.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] and (tmp_path / "afile").read_text() == "mine"


def test_image_and_label_counts_that_differ_are_a_data_error_not_a_silent_trim(tmp_path):
    write_mnist(tmp_path / "data")
    labels = tmp_path / "data" / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    write_idx(labels, np.arange(59) % 10)
    run = run_cli(tmp_path / "run", "data=mnist", f"data.root={tmp_path / 'data'}", "data.download=false")
    assert run.code == 2, run
    assert f"train-images-idx3-ubyte holds 60 images but {labels} holds 59 labels" in run.err


def test_a_full_disk_while_writing_metrics_is_the_clean_error_and_checkpoints_stay_intact(tmp_path, quiet_logs,
                                                                                          monkeypatch):
    t = make_trainer(tmp_path, *SMALL, "trainer.epochs=3")
    real_open = builtins.open

    def full_disk(file, mode="r", *args, **kwargs):
        if Path(str(file)).name == "metrics.jsonl" and (tmp_path / "checkpoints" / "latest").exists():
            raise OSError(28, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_disk)
    with pytest.raises(RunFolderError, match="could not write .*metrics.jsonl: No space left on device; the "
                                             "checkpoints already there are untouched"):
        t.fit()
    latest = (tmp_path / "checkpoints" / "latest").read_text()
    assert ckpt.load(tmp_path / "checkpoints" / latest)["step"] > 0


def test_a_full_disk_while_writing_the_summary_is_the_clean_error_and_checkpoints_stay_intact(tmp_path):
    run = run_cli(tmp_path / "run", *SMALL, "trainer.epochs=1", target=(FAULTS,),
                  env={"DTRAIN_FAULT": "enospc-summary:0:0"})
    assert run.code == 2, run
    assert f"could not write {run.dir / 'summary.json'}: No space left on device" in run.err, run
    assert "Traceback" not in run.err and run.err.count("\n") == 1, run
    assert ckpt.load(run.dir / "checkpoints" / "latest")["step"] == 25  # the final checkpoint came before
    assert not (run.dir / "summary.json").exists()


def test_a_full_disk_while_writing_the_rank_log_is_the_clean_error(tmp_path):
    from dtrain import logs
    from dtrain import world as w
    from dtrain.rundir import RunDir

    class FullDisk(io.StringIO):
        def write(self, text):
            raise OSError(28, "No space left on device")

    logs.setup_console(w.World(), RunDir(tmp_path, w.World()))
    try:
        [handler] = [h for h in logs.log.handlers if getattr(h, "baseFilename", "").endswith("rank0.log")]
        logs.log.info("first line")
        handler.stream = FullDisk()
        with pytest.raises(RunFolderError, match=r"could not write .*rank0.log: No space left on device"):
            logs.log.info("the disk is full now")
    finally:
        logs.close_console()


def test_a_peer_killed_with_sigkill_is_reported_as_dead_not_as_a_timeout(tmp_path):
    # Rank 0 must notice the closed connection: waiting for the collective timeout (dist.timeout_s, 300 s)
    # would outlast finish(), which then fails saying the job is still running.
    job = Live("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", FAULTS, *SMALL,
               "trainer.epochs=50", f"hydra.run.dir={tmp_path / 'run'}", env={"DTRAIN_FAULT": "kill:1:3"})
    assert job.finish(timeout=120) != 0, job
    assert "[rank 0] dtrain: another rank died" in job.stderr and "did not complete within" not in job.stderr, job
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_campaign_of_34_random_faults_breaks_no_invariant(tmp_path):
    import fault_campaign  # tests/fault_campaign.py: kill -9, SIGTERM, Ctrl-C, corrupt newest, full disk, concurrent
    # launch, SIGTERM and Ctrl-C to the whole process group of a job with DataLoader workers, a real disk filled or
    # made read-only under each checkpoint format, uneven FSDP evaluation shards, a rank given other values
    assert fault_campaign.main(["--faults", str(2 * len(fault_campaign.KINDS)), "--seed", "0",
                                "--workdir", str(tmp_path)]) == 0
