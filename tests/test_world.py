"""The world is read from the launcher's environment in one place: torchrun's variables, SLURM's under
srun, or single-process defaults; device and backend follow, and impossible worlds are refused."""

import re

import pytest
import torch

from dtrain import world as w
from conftest import CHILD_ENV, Live, free_port

TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "2",
            "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "job7"}
SRUN = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_NNODES": "4",
        "SLURM_STEP_TASKS_PER_NODE": "2(x4)", "SLURM_NODELIST": "gpu[07-10]", "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0"}


@pytest.mark.unit
def test_a_lone_process_is_rank_zero_of_one_on_the_cpu_with_gloo_or_its_gpu_with_nccl(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    world = w.from_env(env={})
    assert (world.rank, world.world_size, world.launcher, world.is_main, world.distributed) == \
        (0, 1, "single", True, False)
    assert world.device == torch.device("cpu") and world.backend == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert (w.from_env(env={}).device, w.from_env(env={}).backend) == (torch.device("cuda:0"), "nccl")


@pytest.mark.unit
def test_torchrun_variables_give_rank_sizes_nodes_and_rendezvous():
    world = w.from_env(env=TORCHRUN)
    assert (world.rank, world.local_rank, world.world_size, world.local_world_size, world.num_nodes) == (3, 1, 4, 2, 2)
    assert (world.launcher, world.master_addr, world.master_port, world.is_main) == \
        ("torchrun", "10.0.0.5", 29400, False)


@pytest.mark.unit
def test_srun_variables_give_rank_sizes_and_the_first_node_as_master():
    world = w.from_env(env=SRUN)
    assert (world.rank, world.local_rank, world.world_size, world.local_world_size, world.num_nodes) == (5, 1, 8, 2, 4)
    assert (world.launcher, world.master_addr) == ("slurm", "gpu07")
    assert 20000 <= world.master_port < 40000


@pytest.mark.unit
def test_torchrun_inside_a_slurm_job_is_read_as_torchrun():
    assert w.from_env(env={**SRUN, **TORCHRUN}).launcher == "torchrun"


@pytest.mark.unit
def test_a_slurm_batch_script_without_srun_is_a_single_process():
    env = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}
    assert w.from_env(env=env).launcher == "single"


@pytest.mark.unit
@pytest.mark.parametrize("nodelist,first", [("n1", "n1"), ("gpu[03-05,9],cpu1", "gpu03"), ("a-b[1,2]", "a-b1"),
                                             ("node[001-004]", "node001"), ("x1,x2", "x1")])
def test_the_first_host_of_a_slurm_node_list(nodelist, first):
    assert w.first_slurm_host(nodelist) == first


def test_every_process_of_a_launch_computes_the_same_run_id():
    assert w.shared_run_id({"DTRAIN_RUN_ID": "mine", **SRUN}) == "mine"
    assert w.shared_run_id(SRUN) == "job4242"
    assert w.shared_run_id({**SRUN, "SLURM_ARRAY_TASK_ID": "3"}) == "job4242_3"
    assert w.shared_run_id(TORCHRUN) == "rdzv-job7"  # several nodes: the rendezvous id
    one_node = {**TORCHRUN, "GROUP_WORLD_SIZE": "1"}  # one node: the torchrun agent's start time and pid
    first, second = launch_twice(one_node), launch_twice(one_node)
    assert first[0] == first[1] and second[0] == second[1]  # the local ranks of one launch agree
    assert first[0] != second[0]  # and two launches differ
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d-\d+", first[0])  # start time + agent pid


def launch_twice(env: dict) -> list[str]:
    """The run id two worker processes of one agent (a Python parent standing in for torchrun's) compute."""
    import json
    import subprocess
    import sys
    worker = "import dtrain.world as w, json, sys; print(w.shared_run_id(json.loads(sys.argv[1])))"
    agent = ("import subprocess, sys; [print(subprocess.run([sys.executable, '-c', sys.argv[1], sys.argv[2]], "
             "capture_output=True, text=True, check=True).stdout.strip()) for _ in range(2)]")
    out = subprocess.run([sys.executable, "-c", agent, worker, json.dumps(env)], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    return out.split()


@pytest.mark.unit
def test_backend_is_nccl_on_cuda_and_gloo_on_cpu_unless_overridden(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert w.from_env(env=TORCHRUN).backend == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    world = w.from_env(env=TORCHRUN)
    assert world.backend == "nccl" and world.device == torch.device("cuda:1")  # cuda:LOCAL_RANK
    assert w.from_env(backend="gloo", env=TORCHRUN).backend == "gloo"
    assert w.from_env(device="cpu", env=TORCHRUN).backend == "gloo"


@pytest.mark.unit
def test_nccl_without_cuda_is_refused_with_what_to_use_instead():
    with pytest.raises(w.WorldError, match="dist.backend=nccl needs CUDA devices.*use dist.backend=gloo"):
        w.from_env(backend="nccl", env=TORCHRUN)


@pytest.mark.unit
def test_a_cuda_device_on_a_machine_without_one_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(w.WorldError, match="no CUDA device; use trainer.device=cpu"):
        w.from_env(device="cuda", env={})


@pytest.mark.unit
def test_more_local_ranks_than_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(w.WorldError, match="2 processes on this node but only 1 CUDA device"):
        w.from_env(env=TORCHRUN)


@pytest.mark.slow  # in CI's slow tier: the default tier stays under 10 minutes
def test_a_world_that_never_forms_ends_in_bounded_time_naming_the_address(tmp_path):
    port = free_port()  # nobody listens here: rank 1 waits for a rank 0 that never comes
    env = {**CHILD_ENV, "RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    # Bounded: the 5 s timeout ends it; a rank that waited on would still be running when finish() gives up.
    job = Live("-m", "dtrain", "dist.timeout_s=5", f"hydra.run.dir={tmp_path}/run", env=env)
    assert job.finish(timeout=120) == 2, job
    assert f"could not form the process group of 2 at 127.0.0.1:{port} within 5s" in job.stderr, job
    assert "Traceback" not in job.stderr, job
