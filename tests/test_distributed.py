"""DDP semantics, each proven on real multi-process gloo groups launched by torchrun on the CPU."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CHILD_ENV, FAULTS, ROOT, Live, Run, assert_same_weights, final_state, free_port, run_cli

# 1,001 samples: the val split (100) and the train split do not divide evenly between 2 or 4 ranks.
SMALL = ("model=mlp3", "data=synthetic", "data.shape=[1,12,12]", "data.num_samples=1001",
         "data.batch_size=32", "data.eval_batch_size=64", "optim=sgd", "trainer.epochs=2", "seed=3")


def comparable(summary: dict) -> dict:
    return {k: summary[k] for k in ("steps", "val_loss", "val_acc", "val_f1", "val_auc", "val_samples", "test_acc",
                                    "test_f1", "test_auc")}


@pytest.mark.slow  # in CI's slow tier: the default tier stays under 10 minutes
def test_launch_local_sh_starts_n_processes(tmp_path):
    run = run_cli(tmp_path / "run", "debug=fast", launcher=["bash", str(ROOT / "launch" / "local.sh"), "2"],
                  target=(), env={"PATH": f"{Path(sys.executable).parent}:{CHILD_ENV['PATH']}"})
    assert run.code == 0, run
    assert run.summary["world_size"] == 2


def test_two_ranks_match_one_rank_with_the_same_global_batch(tmp_path):
    one = run_cli(tmp_path / "one", *SMALL)
    two = run_cli(tmp_path / "two", *SMALL, nproc=2)
    assert one.code == 0, one
    assert two.code == 0, two
    assert_same_weights(final_state(one), final_state(two))
    # Evaluation counts each of the 100 validation samples once, though they split 50/50 and 64 per batch.
    assert one.summary["val_samples"] == two.summary["val_samples"] == 100
    for key, value in comparable(one.summary).items():
        assert two.summary[key] == pytest.approx(value, abs=1e-6), key
    assert two.summary["world_size"] == 2


@pytest.mark.slow
def test_accumulation_skips_the_all_reduce_on_micro_steps_and_matches_the_large_batch(tmp_path):
    common = (*SMALL, "trainer.max_steps=5")
    big = run_cli(tmp_path / "big", *common, "data.batch_size=64")
    acc = run_cli(tmp_path / "acc", *common, "data.batch_size=16", "trainer.accumulate_grad_batches=4", nproc=2,
                  target=(FAULTS,), env={"DTRAIN_FAULT_COUNT_ALLREDUCE": "1"})
    assert big.code == 0, big
    assert acc.code == 0, acc
    # 5 optimizer steps x 4 micro-batches: DDP all-reduced once per optimizer step, not per micro-batch.
    assert [(acc.dir / f"allreduce-rank{r}.txt").read_text() for r in (0, 1)] == ["5", "5"]
    assert_same_weights(final_state(big), final_state(acc))


@pytest.mark.slow
def test_two_ranks_stop_early_together_and_count_f1_and_auc_over_uneven_shards_like_one_rank(tmp_path):
    # 1,010 samples: 101 validation samples, 51 on rank 0 and 50 on rank 1. No validation after the first
    # can beat it by min_delta, so with patience 1 both runs stop after epoch 2 of 6.
    stopping = (*SMALL, "data.num_samples=1010", "trainer.epochs=6", "checkpoint.monitor=val_loss",
                "trainer.early_stopping.patience=1", "trainer.early_stopping.min_delta=100")
    one = run_cli(tmp_path / "one", *stopping)
    two = run_cli(tmp_path / "two", *stopping, nproc=2)
    assert one.code == 0, one
    assert two.code == 0, two
    for run in (one, two):
        assert (run.summary["epochs"], run.summary["stopped_early"], run.summary["val_samples"]) == (2, True, 101)
        assert "early stopping: val_loss has not improved" in run.err + run.out
    for key, value in comparable(one.summary).items():
        assert two.summary[key] == pytest.approx(value, abs=1e-6), key


def test_no_gloo_thread_outlives_the_process_group(tmp_path):
    # DDP's construction imports torch.distributed.nn, whose default arguments would hold the default
    # group past destroy_process_group(); its gloo threads then ran into the interpreter's exit, where a
    # rank aborted now and then ("terminate called without an active exception").
    run = run_cli(tmp_path / "run", *SMALL, "trainer.max_steps=3", nproc=2, target=(FAULTS,),
                  env={"DTRAIN_LIST_THREADS": str(tmp_path)})
    assert run.code == 0, run
    for rank in (0, 1):
        inside = (tmp_path / f"threads-inside-rank{rank}.txt").read_text().split()
        after = (tmp_path / f"threads-after-rank{rank}.txt").read_text().split()
        assert [t for t in inside if "gloo" in t], inside  # the probe sees gloo's threads while they run
        assert not [t for t in after if "gloo" in t], after


CNN = ("model=convnet", "data=synthetic", "data.shape=[3,16,16]", "data.num_samples=400", "data.batch_size=32",
       "data.eval_batch_size=64", "optim=sgd", "trainer.max_steps=6", "seed=1")


@pytest.mark.slow
def test_batchnorm_buffers_are_the_same_on_every_rank_when_training_ends(tmp_path):
    run = run_cli(tmp_path / "run", *CNN, nproc=2, target=(FAULTS,), env={"DTRAIN_DUMP_STATE": "1"})
    assert run.code == 0, run
    states = [torch.load(run.dir / f"state-rank{r}.pt", weights_only=True) for r in (0, 1)]
    buffers = [k for k in states[0] if "running_" in k]
    assert buffers
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_sync_batchnorm_on_cpu_is_refused_with_what_to_do(tmp_path):
    run = run_cli(tmp_path / "run", *CNN, "model.sync_batchnorm=true", "trainer.device=cpu", nproc=2)
    assert run.code != 0
    assert run.err.count("model.sync_batchnorm=true needs CUDA devices") == 1, run


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices: PyTorch's SyncBatchNorm is GPU-only")
def test_sync_batchnorm_makes_two_gpus_match_one_and_plain_batchnorm_does_not(tmp_path):
    one = run_cli(tmp_path / "one", *CNN)
    synced = run_cli(tmp_path / "sync", *CNN, "model.sync_batchnorm=true", nproc=2)
    plain = run_cli(tmp_path / "plain", *CNN, nproc=2)
    for run in (one, synced, plain):
        assert run.code == 0, run
    assert_same_weights(final_state(one), final_state(synced), rtol=1e-4, atol=1e-5)  # incl. running stats
    with pytest.raises(AssertionError):  # per-rank batch statistics differ from the global batch's
        assert_same_weights(final_state(one), final_state(plain), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_the_same_seed_and_world_size_repeat_a_two_rank_run_exactly(tmp_path):
    lenet = (*SMALL, "model=lenet", "data.shape=[1,28,28]")
    a = run_cli(tmp_path / "a", *lenet, nproc=2)
    b = run_cli(tmp_path / "b", *lenet, nproc=2)
    assert a.code == 0 and b.code == 0, (a, b)
    sa, sb = final_state(a), final_state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert comparable(a.summary) == comparable(b.summary)


def torchrun(run_dir: Path, *overrides: str, fault: str) -> Live:
    """`torchrun --standalone --nproc_per_node=2 tests/faults.py` in its own session: `Live.finish(timeout)`
    ends the whole group, workers included, and fails saying so if the job is still running by then."""
    return Live("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", FAULTS, *overrides,
                f"hydra.run.dir={run_dir}", env={"DTRAIN_FAULT": fault})


def test_a_rank_that_raises_stops_the_whole_job_quickly_naming_the_rank(tmp_path):
    # 50 epochs and dist.timeout_s=300: a job that waited for the timeout, or trained on, would still be
    # running when finish() gives up; one that stops on the error ends in seconds.
    job = torchrun(tmp_path / "run", *SMALL, "trainer.epochs=50", fault="raise:1:3")
    assert job.finish(timeout=120) != 0, job
    assert "[rank 1] dtrain: RuntimeError: injected failure at step 3" in job.stderr, job
    assert "did not complete within" not in job.stderr, job  # stopped on the error, not at a collective timeout
    assert not (tmp_path / "run" / "summary.json").exists()  # and not after training to the end
    logged = (tmp_path / "run" / "rank1.log").read_text()  # readable after the fact, with where it happened
    assert "[rank 1] ERROR [rank 1] dtrain: RuntimeError: injected failure" in logged and "faulty_step" in logged


@pytest.mark.slow  # in CI's slow tier: the default tier stays under 10 minutes
def test_a_stuck_rank_ends_the_job_at_the_collective_timeout_with_a_clear_message(tmp_path):
    # Rank 1 sleeps for hours at step 3: only the 8 s collective timeout can end the job before finish() gives up.
    job = torchrun(tmp_path / "run", *SMALL, "trainer.epochs=50", "dist.timeout_s=8", fault="hang:1:3")
    assert job.finish(timeout=150) != 0, job
    assert "[rank 0] dtrain: a collective did not complete within dist.timeout_s=8" in job.stderr, job
    assert not (tmp_path / "run" / "summary.json").exists()


def launch_node(port: int, run_dir, *overrides):
    """One 'node': launch/multinode.sh, as a user runs it on each machine."""
    env = {**CHILD_ENV, "NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "NPROC_PER_NODE": "2", "RUN_ID": "mn", "PATH": f"{Path(sys.executable).parent}:{CHILD_ENV['PATH']}"}
    return subprocess.Popen([str(ROOT / "launch" / "multinode.sh"), *overrides], cwd=run_dir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_nodes_of_two_ranks_train_like_four_ranks_on_one_node(tmp_path):
    single = run_cli(tmp_path / "single", *SMALL, nproc=4, timeout=300)
    assert single.code == 0, single
    port = free_port()
    nodes = [launch_node(port, tmp_path, *SMALL) for _ in (0, 1)]
    outs = [n.communicate(timeout=300) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs
    # Both nodes computed the same run folder (the rendezvous id), and only global rank 0 wrote it.
    folders = list((tmp_path / "runs" / "mlp3-synthetic").iterdir())
    assert [f.name for f in folders] == ["rdzv-mn"]
    multi = Run(subprocess.CompletedProcess([], 0, *outs[0]), folders[0])
    assert (multi.summary["world_size"], multi.summary["num_nodes"]) == (4, 2)
    assert_same_weights(final_state(single), final_state(multi))
    assert comparable(multi.summary) == pytest.approx(comparable(single.summary))
