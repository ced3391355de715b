"""dtrain under a real SLURM: `srun` alone starts ranks that train like torchrun, and the batch scripts in
slurm/ run the launcher, survive preemption by checkpointing and requeueing, and never requeue a broken
job. Runs where a SLURM cluster answers; `slurm/local-cluster.sh start` brings up a one-host one (CI does)."""

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CHILD_ENV, FAULTS, ROOT, Run, assert_same_weights, final_state, run_cli


def cluster_up() -> bool:
    if shutil.which("srun") is None:
        return False
    return subprocess.run(["sinfo", "-h"], env=CHILD_ENV, capture_output=True, timeout=20).returncode == 0


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not cluster_up(), reason="no SLURM cluster answers (slurm/local-cluster.sh start)")]

SMALL = ("model=mlp3", "data=synthetic", "data.shape=[1,12,12]", "data.num_samples=1001",
         "data.batch_size=32", "data.eval_batch_size=64", "optim=sgd", "trainer.epochs=2", "seed=3")


def test_srun_alone_starts_two_ranks_that_train_like_one_process(tmp_path):
    one = run_cli(tmp_path / "one", *SMALL)
    proc = subprocess.run(["srun", "-n2", "--kill-on-bad-exit=1", sys.executable, "-m", "dtrain", *SMALL],
                          cwd=tmp_path, env=CHILD_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # The run folder is named after the SLURM job, so every rank (and a requeued job) finds the same one.
    folders = list((tmp_path / "runs" / "mlp3-synthetic").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("job"), folders
    srun = Run(subprocess.CompletedProcess([], 0, proc.stdout, proc.stderr), folders[0])
    assert "launcher=slurm" in proc.stdout and srun.summary["world_size"] == 2
    assert_same_weights(final_state(one), final_state(srun))


# -- the batch scripts ---------------------------------------------------------------------------------

def submit(folder: Path, *overrides: str, env: dict | None = None) -> str:
    """`sbatch slurm/train-cpu.sbatch ...` from a folder of the user's that holds slurm/."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    (folder / "slurm").symlink_to(ROOT / "slurm")
    env = {**CHILD_ENV, "PATH": f"{Path(sys.executable).parent}:{CHILD_ENV['PATH']}", **(env or {})}
    proc = subprocess.run(["sbatch", "--parsable", "slurm/train-cpu.sbatch", *overrides], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=CHILD_ENV, capture_output=True,
                         text=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def wait(job_id: str, timeout: float = 400) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job(job_id)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end within {timeout}s: {job(job_id)}")


def test_the_cpu_batch_script_runs_the_launcher_with_two_workers_to_completion(tmp_path):
    job_id = submit(tmp_path, *SMALL)
    info = wait(job_id)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), info
    run = tmp_path / "runs" / "mlp3-synthetic" / f"job{job_id}"
    summary = Run(subprocess.CompletedProcess([], 0, "", ""), run).summary
    assert (summary["world_size"], summary["steps"]) == (2, 50)
    assert (run / "slurm.out").resolve() == (tmp_path / f"slurm-dtrain-cpu-{job_id}.out").resolve()


def test_a_warned_job_checkpoints_requeues_itself_and_ends_like_an_uninterrupted_one(tmp_path):
    config = (*SMALL, "trainer.epochs=3", "checkpoint.every_n_steps=10")
    reference = run_cli(tmp_path / "reference", *config, "launcher.nproc_per_node=2", launcher=[sys.executable],
                        target=("-m", "dtrain.launch"))
    assert reference.code == 0, reference
    slow = {"DTRAIN_LAUNCH": f"{sys.executable} {FAULTS} --launch", "DTRAIN_FAULT": "slow:0:5"}
    job_id = submit(tmp_path / "job", *config, env=slow)
    run = tmp_path / "job" / "runs" / "mlp3-synthetic" / f"job{job_id}"
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "latest").exists():
        assert time.monotonic() < deadline, job(job_id)
        time.sleep(0.3)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=CHILD_ENV, check=True, timeout=30)
    info = wait(job_id)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), info
    log = (run / "slurm.out").read_text()
    assert "stopped by SIGUSR1 after step" in log and "requeueing job" in log and "resumed from" in log, log
    assert_same_weights(final_state(reference), final_state(Run(subprocess.CompletedProcess([], 0, "", ""), run)),
                        rtol=0, atol=0)


def test_a_job_with_bad_input_fails_with_exit_2_and_is_never_requeued(tmp_path):
    job_id = submit(tmp_path, *SMALL, "optim.lr=-1")
    info = wait(job_id)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0"), info
    log = (tmp_path / f"slurm-dtrain-cpu-{job_id}.out").read_text()
    assert "dtrain: error: optim.lr=-1.0 is not allowed" in log and "requeueing" not in log


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_the_launch_and_slurm_scripts_pass_shellcheck():
    scripts = [*map(str, (ROOT / "slurm").glob("*.sh")), *map(str, (ROOT / "slurm").glob("*.sbatch")),
               *map(str, (ROOT / "launch").glob("*.sh"))]
    proc = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


def test_a_two_point_sweep_through_hydras_submitit_launcher_runs_each_point_as_a_two_rank_job(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'dtrain[slurm]'")
    tmp_path.chmod(0o755)
    proc = subprocess.run([sys.executable, "-m", "dtrain", "-m", "optim.lr=0.1,0.01", *SMALL, "trainer.epochs=1",
                           "hydra/launcher=slurm", "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1"],
                          cwd=tmp_path, env=CHILD_ENV, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [sweep] = (tmp_path / "runs" / "multirun").iterdir()  # one sweep folder, named by the submitting process
    points = sorted(p.parent for p in sweep.glob("*/summary.json"))
    assert [p.name for p in points] == ["0-mlp3-synthetic", "1-mlp3-synthetic"]
    for point, lr in zip(points, (0.1, 0.01)):
        summary = Run(subprocess.CompletedProcess([], 0, "", ""), point).summary
        assert summary["world_size"] == 2 and summary["steps"] == 25
        assert f"lr: {lr}" in (point / "config.yaml").read_text()


def test_a_sweep_point_warned_by_submitits_signal_checkpoints_is_requeued_and_ends_like_an_uninterrupted_one(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'dtrain[slurm]'")
    point = ("-m", "optim.lr=0.01", *SMALL, "trainer.epochs=120", "hydra/launcher=slurm",
             "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1")
    runs = {}
    for name, warn in (("whole", False), ("warned", True)):
        folder = tmp_path / name
        folder.mkdir(mode=0o755)
        sweep = subprocess.Popen([sys.executable, "-m", "dtrain", *point], cwd=folder, env=CHILD_ENV,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if warn:  # what submitit's #SBATCH --signal=USR2@... sends every task before the time limit
            deadline = time.monotonic() + 300
            while not list(folder.glob("runs/multirun/*/0-*/checkpoints/latest")):
                assert time.monotonic() < deadline and sweep.poll() is None, sweep.communicate()
                time.sleep(0.3)
            job_id = subprocess.run(["squeue", "-h", "-o", "%A"], env=CHILD_ENV, capture_output=True, text=True,
                                    timeout=30).stdout.split()[0]
            subprocess.run(["scancel", "--signal=USR2", job_id], env=CHILD_ENV, check=True, timeout=30)
        out, err = sweep.communicate(timeout=500)
        assert sweep.returncode == 0, err[-3000:]
        [runs[name]] = folder.glob("runs/multirun/*/0-*")
    log = (runs["warned"] / "rank0.log").read_text()
    assert "stopped by SIGUSR2 after step" in log and "resumed from" in log, log
    whole, warned = (Run(subprocess.CompletedProcess([], 0, "", ""), r) for r in (runs["whole"], runs["warned"]))
    assert_same_weights(final_state(whole), final_state(warned), rtol=0, atol=0)


def wait_for(what: str, ready, job_id: str, timeout: float = 300) -> None:
    """Until `ready()` holds; fails if the job ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not ready():
        state = job(job_id).get("JobState")
        if state not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING"):
            assert ready(), f"job ended before {what}: {job(job_id)}"
            return
        assert time.monotonic() < deadline, f"no {what} within {timeout} s: {job(job_id)}"
        time.sleep(0.3)


def latest_step(run: Path) -> int:
    latest = run / "checkpoints" / "latest"
    return int(latest.read_text().strip().removeprefix("step-").removesuffix(".pt")) if latest.exists() else -1


SLOW_LAUNCH = {"DTRAIN_LAUNCH": f"{sys.executable} {FAULTS} --launch", "DTRAIN_FAULT": "slow:0:5"}


def test_scancel_makes_the_job_checkpoint_its_current_step_and_end_without_requeueing(tmp_path):
    job_id = submit(tmp_path, *SMALL, "trainer.epochs=3", "checkpoint.every_n_steps=7", env=SLOW_LAUNCH)
    run = tmp_path / "runs" / "mlp3-synthetic" / f"job{job_id}"
    wait_for("first checkpoint", lambda: latest_step(run) > 0, job_id)
    subprocess.run(["scancel", job_id], env=CHILD_ENV, check=True, timeout=30)  # SIGTERM, as a user's scancel
    info = wait(job_id)
    deadline = time.monotonic() + 60  # the job is CANCELLED at once; its shell links the log once srun is done
    while not (run / "slurm.out").exists():
        assert time.monotonic() < deadline, (tmp_path / f"slurm-dtrain-cpu-{job_id}.out").read_text()
        time.sleep(0.3)
    log = (run / "slurm.out").read_text()
    stopped = re.findall(r"stopped by SIGTERM after step (\d+): checkpoint saved", log)
    assert len(stopped) == 1, log
    assert latest_step(run) == int(stopped[0]) and int(stopped[0]) < 75, log  # the step it stopped at, mid-training
    assert "requeueing" not in log and "resumed from" not in log, log
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), info
    time.sleep(15)  # longer than a requeue takes to show (cred_expire 10 s + a scheduler pass)
    assert (job(job_id)["JobState"], job(job_id)["Restarts"]) == ("CANCELLED", "0")


def test_a_job_warned_more_often_than_dtrain_max_requeues_checkpoints_and_fails_with_75_without_requeueing(tmp_path):
    job_id = submit(tmp_path, *SMALL, "trainer.epochs=6", "checkpoint.every_n_steps=10",
                    env={**SLOW_LAUNCH, "DTRAIN_MAX_REQUEUES": "1"})
    run = tmp_path / "runs" / "mlp3-synthetic" / f"job{job_id}"
    log = tmp_path / f"slurm-dtrain-cpu-{job_id}.out"
    warned_at = []
    for attempt in range(2):
        # Warn once training runs (a checkpoint after any earlier stop, so the resumed run's handlers are up).
        wait_for(f"a checkpoint in run {attempt + 1}", lambda: latest_step(run) > max(warned_at, default=0), job_id)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=CHILD_ENV, check=True, timeout=30)
        wait_for(f"the stop of run {attempt + 1}",
                 lambda: log.read_text().count("stopped by SIGUSR1 after step") > attempt, job_id)
        warned_at.append(latest_step(run))
    info = wait(job_id)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "75:0", "1"), (info, text)
    assert text.count("requeueing job") == 1 and text.count("resumed from") == 1, text
    assert "not requeueing: already requeued 1 times (DTRAIN_MAX_REQUEUES)" in text, text
    stops = [int(s) for s in re.findall(r"stopped by SIGUSR1 after step (\d+): checkpoint saved", text)]
    assert stops == warned_at and stops[0] < stops[1] < 150, text  # each stop saved its step; training unfinished
    assert not (run / "summary.json").exists()
