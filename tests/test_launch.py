"""`python -m dtrain.launch`: the config is validated once before any worker starts, torch's elastic agent
starts the workers in-process, and the exit code means what a single process's would."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CHILD_ENV, FAULTS, ROOT, Live, Run, assert_same_weights, final_state, run_cli

SMALL = ("model=mlp3", "data=synthetic", "data.shape=[1,12,12]", "data.num_samples=1001",
         "data.batch_size=32", "data.eval_batch_size=64", "optim=adam", "trainer.epochs=3", "seed=5",
         "checkpoint.every_n_steps=10")
LAUNCH = [sys.executable, "-m", "dtrain.launch"]
TWO = "launcher.nproc_per_node=2"


def launch(tmp_path: Path, *overrides: str, fault: str = "", timeout: float = 240) -> Run:
    target = (FAULTS, "--launch") if fault else ("-m", "dtrain.launch")
    return run_cli(tmp_path / "run", *overrides, launcher=[sys.executable], target=target, timeout=timeout,
                   env={"DTRAIN_FAULT": fault} if fault else None)


@pytest.mark.parametrize("overrides,message", [
    (["optim.lr=-1"], "dtrain: error: optim.lr=-1.0 is not allowed: must be > 0"),
    (["trainer.epochz=3"], "dtrain: error: Could not override 'trainer.epochz': Key 'epochz' not in 'TrainerConfig'"),
    (["model=nope"], "dtrain: error: In 'config': Could not find 'model/nope'"),
    (["data.batch_size=63"],
     "data.batch_size=63 is not allowed: the global batch must divide evenly by the world size 2"),
    (["trainer.sync_every_n_steps=0"], "trainer.sync_every_n_steps=0 is not allowed: must be > 0"),
    (["launcher.rdzv_endpoint=nohost:abc"], "launcher.rdzv_endpoint='nohost:abc' is not allowed: HOST:PORT"),
    (["launcher.rdzv_endpoint=no-such-host.invalid:29500"], "the host 'no-such-host.invalid' cannot be resolved"),
    (["--cfg", "job"], "dtrain: error: --cfg: dtrain.launch takes key=value overrides, --config-dir DIR"),
    (["--config-dir", "no-such-folder"], "dtrain: error: --config-dir no-such-folder: no such folder"),
])
def test_bad_input_is_one_line_and_exit_2_before_any_worker_starts(tmp_path, overrides, message):
    proc = subprocess.run([*LAUNCH, TWO, *overrides], cwd=tmp_path, env=CHILD_ENV, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no run folder


def test_two_workers_train_like_one_process_and_one_process_runs_in_the_launcher_itself(tmp_path):
    one = launch(tmp_path / "one", *SMALL, "launcher.nproc_per_node=1")
    two = launch(tmp_path / "two", *SMALL, TWO)
    assert one.code == 0 and two.code == 0, (one, two)
    assert "launcher=single" in one.out and "dtrain.launch:" not in one.out  # no agent, no worker process
    assert "dtrain.launch: 2 process(es) x 1 node(s)" in two.out and two.summary["world_size"] == 2
    assert_same_weights(final_state(one), final_state(two))


def test_a_worker_that_fails_makes_the_launcher_exit_1_with_its_message_and_not_torchruns(tmp_path):
    run = launch(tmp_path, *SMALL, TWO, fault="raise:1:3")
    assert run.code == 1, run
    assert "[rank 1] dtrain: RuntimeError: injected failure at step 3" in run.err
    assert "ChildFailedError" not in run.err and "torch/distributed/elastic" not in run.err, run


def test_a_preempted_worker_makes_the_launcher_exit_75_after_the_checkpoint(tmp_path):
    run = launch(tmp_path, *SMALL, TWO, fault="term:1:23")
    assert run.code == 75, run
    # Ranks agree on a stop every trainer.sync_every_n_steps (10): the first agreement after step 23 is 30.
    assert (run.dir / "checkpoints" / "latest").read_text() == "step-00000030.pt"


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 75), (signal.SIGUSR1, 75), (signal.SIGINT, 130)])
def test_a_signal_to_the_launcher_reaches_every_worker_which_checkpoint_and_stop(tmp_path, sig, code):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, FAULTS, "--launch", *SMALL, TWO, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                            env={**CHILD_ENV, "DTRAIN_FAULT": "slow:0:5"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "latest").exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert f"stopped by {signal.Signals(sig).name} after step" in out, out
    stopped = int((run_dir / "checkpoints" / "latest").read_text()[5:13])
    assert 10 < stopped < 75  # saved where the signal found it, not at a cadence step


@pytest.mark.slow
def test_a_killed_worker_is_restarted_with_max_restarts_and_the_run_ends_as_if_never_killed(tmp_path):
    reference = launch(tmp_path / "ref", *SMALL, TWO)
    restarted = launch(tmp_path / "killed", *SMALL, TWO, "launcher.max_restarts=1", fault="kill:1:45")
    assert reference.code == 0 and restarted.code == 0, restarted
    assert "resumed from" in restarted.out
    assert_same_weights(final_state(reference), final_state(restarted), rtol=0, atol=0)


def test_the_plan_reads_nodes_rendezvous_and_run_folder_from_a_slurm_allocation(monkeypatch):
    from dtrain import launch
    from conftest import make_config
    monkeypatch.setattr(launch.torch.cuda, "is_available", lambda: False)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    p = launch.plan(make_config(), slurm)
    assert (p.nproc_per_node, p.nnodes, p.world_size) == (1, 2, 2)
    assert (p.rdzv_endpoint, p.rdzv_id, p.run_id) == ("gpu07:24242", "4242", "job4242")  # port from the job id
    mine = launch.plan(make_config("launcher.nproc_per_node=2", "launcher.rdzv_endpoint=head:29400"), slurm)
    assert (mine.world_size, mine.rdzv_endpoint) == (4, "head:29400")


def test_several_nodes_outside_slurm_need_a_rendezvous_endpoint():
    from dtrain import launch
    from dtrain.errors import ConfigError
    from conftest import make_config
    with pytest.raises(ConfigError, match="launcher.nnodes=2 needs launcher.rdzv_endpoint=HOST:PORT"):
        launch.plan(make_config("launcher.nnodes=2"), {})
    p = launch.plan(make_config("launcher.nnodes=2", "launcher.rdzv_endpoint=n0:29500", "launcher.rdzv_id=exp"), {})
    assert (p.rdzv_endpoint, p.run_id) == ("n0:29500", "rdzv-exp")  # the same folder on every node


# -- a rendezvous that cannot form ends within dist.timeout_s with one line, never a hang ------------

@pytest.fixture
def held_port():
    """A port held by a plain listening socket: accepts connections, answers nothing."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_busy_rendezvous_port_on_one_node_is_one_line_and_exit_2(tmp_path, held_port):
    proc = subprocess.run([*LAUNCH, TWO, f"launcher.rdzv_endpoint=localhost:{held_port}", "dist.timeout_s=20"],
                          cwd=tmp_path, env=CHILD_ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert f"launcher.rdzv_endpoint=localhost:{held_port}: port {held_port} is in use on this host" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_an_endpoint_held_by_something_that_is_not_a_store_fails_within_the_timeout_on_several_nodes(tmp_path,
                                                                                                   held_port):
    # The socket never answers: only dist.timeout_s=5 ends the wait; a hang is still running when finish()
    # gives up (and fails saying so).
    job = Live("-m", "dtrain.launch", TWO, "launcher.nnodes=2", f"launcher.rdzv_endpoint=127.0.0.1:{held_port}",
               "dist.timeout_s=5", cwd=tmp_path)
    assert job.finish(timeout=120) == 2, job
    assert "no rendezvous store answered within dist.timeout_s=5" in job.stderr, job
    assert len(job.stderr.strip().splitlines()) == 1 and "Traceback" not in job.stderr, job
    assert list(tmp_path.iterdir()) == []


def test_a_node_whose_peers_never_come_gives_up_within_the_timeout(tmp_path):
    from conftest import free_port
    proc = subprocess.run([*LAUNCH, TWO, "launcher.nnodes=2", f"launcher.rdzv_endpoint=127.0.0.1:{free_port()}",
                           "dist.timeout_s=5", *SMALL, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                          env=CHILD_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "did not form within dist.timeout_s=5" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_a_worker_that_dies_at_start_up_ends_the_job_with_one_line_naming_it(tmp_path):
    run = launch(tmp_path, *SMALL, TWO, "dist.timeout_s=20", fault="diestart:1:0", timeout=120)
    assert run.code == 1, run
    assert "dtrain.launch: rank 1 exited with code 1 without a message of its own" in run.err, run
    assert "Traceback" not in run.err and "torch/distributed/elastic" not in run.err, run


@pytest.mark.slow
def test_a_worker_that_hangs_before_the_first_collective_ends_the_job_at_the_timeout(tmp_path):
    # Rank 1 sleeps for hours before its first collective: only the 10 s timeout can end the job before
    # finish() gives up on it (ending the whole group, workers included, and failing with what it printed).
    job = Live(FAULTS, "--launch", *SMALL, TWO, "dist.timeout_s=10", f"hydra.run.dir={tmp_path / 'run'}",
               env={"DTRAIN_FAULT": "hangstart:1:0"})
    assert job.finish(timeout=150) == 1, job
    assert "[rank 0] dtrain: a collective did not complete within dist.timeout_s=10" in job.stderr, job
    assert "Traceback" not in job.stderr, job
    assert not (tmp_path / "run" / "summary.json").exists()
