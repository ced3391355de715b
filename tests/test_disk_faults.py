"""A full disk or a read-only folder, for real (a small tmpfs mounted for the test): every write dtrain makes
either completes or stops the run with one line naming the file and exit 2; nothing is left half-written, a
temporary checkpoint is cleaned up, and `latest` still names the last good checkpoint."""

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from conftest import FAULTS, Live, run_cli
from dtrain import checkpoint as ckpt
from dtrain import dcp

SMALL = ("trainer.epochs=2", "logger.plots=false", "dist.timeout_s=60")


@pytest.fixture
def disk(tmp_path):
    """`disk(size, readonly=False)`: a fresh tmpfs of `size` (e.g. "3m"), unmounted after the test."""
    mounted: list[Path] = []

    def mount(size: str, at: Path | None = None, readonly: bool = False) -> Path:
        at = at or tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
        at.mkdir(parents=True, exist_ok=True)
        options = f"size={size}" + (",ro" if readonly else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(at)], capture_output=True)
        if done.returncode:
            pytest.skip(f"needs root to mount a tmpfs (a real full or read-only disk): {done.stderr.decode().strip()}")
        mounted.append(at)
        return at

    yield mount
    for at in reversed(mounted):
        subprocess.run(["umount", "-l", str(at)], capture_output=True)


def fill(folder: Path) -> None:
    """Leave no free byte on `folder`'s file system (the filler is the test's own file)."""
    subprocess.run(["sh", "-c", f"cat /dev/zero > {folder / 'filler'}"], capture_output=True)


def assert_nothing_half_written(run_dir: Path) -> None:
    """Every record parses; `latest` names a complete checkpoint; no temporary checkpoint is left."""
    for name in ("summary.json", "config.yaml", "metrics.jsonl"):
        path = run_dir / name
        assert not path.exists() or path.stat().st_size > 0, f"{name} is empty"
    if (run_dir / "summary.json").exists():
        json.loads((run_dir / "summary.json").read_text())
    if (run_dir / "metrics.jsonl").exists():
        [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    folder = run_dir / "checkpoints"
    assert not list(folder.glob(".*.tmp*")), sorted(p.name for p in folder.iterdir())
    if (folder / "latest").exists():
        ckpt.load(folder / "latest")  # loads: complete, not corrupt
    if (folder / "best").exists():
        ckpt.load(folder / "best")


def assert_one_line_exit_2(run, what: str) -> None:
    """Exit 2 (torchrun itself exits 1 and reports the ranks' codes), `what` said once, no traceback of ours."""
    torchrun = "elastic" in run.err
    assert run.code == (1 if torchrun else 2), run
    assert not torchrun or "exitcode  : 2" in run.err, run
    assert run.err.count("dtrain: error: ") == 1 and what in run.err, run
    assert run.err.count("Traceback") == (1 if torchrun else 0) and "Exception in thread" not in run.err, run


def test_an_asynchronous_distributed_checkpoint_that_fills_the_disk_stops_the_run_in_one_line(disk):
    run = run_cli(disk("3m") / "run", *SMALL, "dist.strategy=fsdp", "checkpoint.async_save=true",
                  "checkpoint.every_n_steps=10", nproc=2, timeout=300)
    assert_one_line_exit_2(run, "could not write the checkpoint of step")
    assert "No space left on device" in run.err, run
    assert_nothing_half_written(run.dir)
    assert dcp.is_checkpoint(ckpt.follow_latest(run.dir / "checkpoints" / "latest"))


def test_a_checkpoint_file_on_a_full_disk_is_one_line_and_the_last_good_one_stays_latest(disk):
    run = run_cli(disk("1m") / "run", *SMALL, "checkpoint.every_n_steps=20", timeout=300)
    assert_one_line_exit_2(run, "could not write a checkpoint in")
    assert "No space left on device" in run.err and "enforce fail" not in run.err, run
    assert_nothing_half_written(run.dir)


def test_a_full_disk_after_the_first_epoch_is_one_line_and_never_an_empty_summary(disk):
    root = disk("4m")
    job = Live(FAULTS, "trainer.epochs=2", "data.batch_size=512", "checkpoint.enabled=false", "logger.plots=false",
               f"hydra.run.dir={root / 'run'}", env={"DTRAIN_FAULT": "slow:0:18"})  # slow after epoch 1 (17 steps)
    job.wait_for("epoch 1 step 17 |")
    fill(root)
    code = job.finish(timeout=300)
    assert code == 2, job
    assert job.stderr.count("dtrain: error: could not write") == 1, job
    assert "No space left on device" in job.stderr and "Traceback" not in job.stderr, job
    assert not (root / "run" / "summary.json").exists()
    assert_nothing_half_written(root / "run")


@pytest.mark.slow
def test_a_synchronous_distributed_checkpoint_that_fills_the_disk_stops_the_run_in_one_line(disk):
    run = run_cli(disk("3m") / "run", *SMALL, "dist.strategy=fsdp", "checkpoint.every_n_steps=10", nproc=2,
                  timeout=300)
    assert_one_line_exit_2(run, "could not write a checkpoint in")
    assert "No space left on device" in run.err, run
    assert_nothing_half_written(run.dir)


@pytest.mark.slow
@pytest.mark.parametrize("overrides,nproc", [
    ((), 1),
    (("dist.strategy=fsdp",), 2),
    (("dist.strategy=fsdp", "checkpoint.async_save=true"), 2),
], ids=["file", "dcp", "dcp-async"])
def test_a_read_only_checkpoint_folder_is_one_line(disk, tmp_path, overrides, nproc):
    run_dir = tmp_path / "run"
    disk("1m", at=run_dir / "checkpoints", readonly=True)
    run = run_cli(run_dir, *SMALL, "checkpoint.every_n_steps=10", *overrides, nproc=nproc, timeout=300)
    assert_one_line_exit_2(run, "could not write")
    assert "Read-only file system" in run.err, run
    assert not list((run_dir / "checkpoints").iterdir())
