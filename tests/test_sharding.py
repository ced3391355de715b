"""dist.strategy=fsdp: FSDP2 shards parameters, gradients and optimizer state, trains what DDP trains, and
saves distributed checkpoints (one folder, every rank its shards) that reshard to any world size and to
DDP and back; what FSDP cannot do is refused in one line."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import CHILD_ENV, FAULTS, ROOT, assert_same_weights, make_config, run_cli
from dtrain import checkpoint as ckpt
from dtrain.errors import ConfigError

SMALL = ("model=mlp3", "data=synthetic", "data.shape=[1,12,12]", "data.num_samples=1001", "data.batch_size=32",
         "data.eval_batch_size=64", "trainer.epochs=2", "seed=3", "logger.plots=false")
CONV = ("model=lenet", "data=synthetic", "data.shape=[1,28,28]", "data.num_samples=600", "data.batch_size=32",
        "data.eval_batch_size=64", "trainer.max_steps=12", "seed=3", "logger.plots=false")


def weights(run_dir) -> dict[str, torch.Tensor]:
    """The newest checkpoint's model, a file's or a distributed checkpoint's (consolidated here)."""
    return ckpt.weights(ckpt.load(run_dir / "checkpoints" / "latest"))


@pytest.mark.parametrize("overrides,message", [
    (["model.sync_batchnorm=true"], "model.sync_batchnorm=True is not allowed: an option of DistributedDataParallel"),
    (["dist.find_unused_parameters=true"], "dist.find_unused_parameters=True is not allowed: an option of "
                                           "DistributedDataParallel; with dist.strategy=fsdp leave it at its default"),
    (["dist.static_graph=true"], "dist.static_graph=True is not allowed"),
    (["trainer.compile=true"], "trainer.compile=True is not allowed: not with dist.strategy=fsdp"),
    (["trainer.precision=fp16"], "trainer.precision='fp16' is not allowed: dist.strategy=fsdp trains in fp32 or bf16"),
])
def test_what_fsdp_cannot_do_is_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        make_config("dist.strategy=fsdp", *overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_sharding_options_that_need_fsdp_or_dcp_are_refused_without_them():
    with pytest.raises(ConfigError, match=r"dist.fsdp.meta_init=True is not allowed: an option of FSDP; with "
                                          r"dist.strategy=ddp leave it at its default \(it needs dist.strategy=fsdp\)"):
        make_config("dist.fsdp.meta_init=true")
    with pytest.raises(ConfigError, match="checkpoint.async_save=True is not allowed: needs distributed checkpoints"):
        make_config("checkpoint.async_save=true")
    make_config("checkpoint.async_save=true", "checkpoint.format=dcp")  # DCP under DDP is allowed


@pytest.mark.slow
@pytest.mark.parametrize("workload", [SMALL, CONV], ids=["mlp", "conv"])
def test_fsdp_trains_the_weights_ddp_trains_and_holds_half_the_state_per_rank(tmp_path, workload):
    common = (*workload, "trainer.accumulate_grad_batches=2", "trainer.grad_clip=0.5", "checkpoint.format=file")
    ddp = run_cli(tmp_path / "ddp", *common, nproc=2, timeout=300)
    fsdp = run_cli(tmp_path / "fsdp", *common, "dist.strategy=fsdp", nproc=2, timeout=300)
    assert ddp.code == 0, ddp
    assert fsdp.code == 0, fsdp
    assert_same_weights(weights(ddp.dir), weights(fsdp.dir))  # accumulation and clipping included
    full, shard = ddp.summary["state_bytes_per_rank"], fsdp.summary["state_bytes_per_rank"]
    for kind in ("parameters", "gradients", "optimizer"):
        assert shard[kind] <= 0.55 * full[kind], kind  # each rank holds its half (plus a remainder)


@pytest.mark.slow
@pytest.mark.parametrize("saved,resumed", [("fsdp", "fsdp"), ("fsdp", "ddp"), ("ddp", "fsdp")])
def test_a_distributed_checkpoint_resumes_on_another_strategy_and_world_size(tmp_path, saved, resumed):
    common = (*SMALL, "checkpoint.format=dcp", "checkpoint.every_n_steps=10")
    reference = run_cli(tmp_path / "ref", *common, f"dist.strategy={saved}", nproc=2, timeout=300)
    first = run_cli(tmp_path / "run", *common, f"dist.strategy={saved}", nproc=2, target=(FAULTS,),
                    env={"DTRAIN_FAULT": "raise:1:35"}, timeout=300)
    assert reference.code == 0 and first.code != 0, (reference, first)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-00000030"
    for nproc in ((2,) if saved == resumed else (1, 2)):
        where = tmp_path / f"resumed-{nproc}"
        subprocess.run(["cp", "-r", str(tmp_path / "run"), str(where)], check=True)
        run = run_cli(where, *common, f"dist.strategy={resumed}", nproc=nproc, timeout=300)
        assert run.code == 0 and "resumed from" in run.out and "step-00000030" in run.out, run
        if saved == resumed and nproc == 2:  # the same strategy and world size: exactly the same run
            assert_same_weights(weights(reference.dir), weights(run.dir), rtol=0, atol=0)
        else:
            assert_same_weights(weights(reference.dir), weights(run.dir))


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [3, 4])
def test_a_distributed_checkpoint_of_two_ranks_resumes_on_three_or_four(tmp_path, ranks):
    # A global batch of 48 splits over 2, 3 and 4 ranks alike.
    common = (*SMALL, "data.batch_size=48", "data.eval_batch_size=96", "checkpoint.format=dcp",
              "checkpoint.every_n_steps=10", "dist.strategy=fsdp")
    reference = run_cli(tmp_path / "ref", *common, nproc=2, timeout=300)
    first = run_cli(tmp_path / "run", *common, nproc=2, target=(FAULTS,), env={"DTRAIN_FAULT": "raise:1:25"},
                    timeout=300)
    assert reference.code == 0 and first.code != 0
    run = run_cli(tmp_path / "run", *common, nproc=ranks, timeout=300)
    assert run.code == 0 and "step-00000020" in run.out, run
    assert_same_weights(weights(reference.dir), weights(run.dir))


def test_a_distributed_checkpoint_copies_the_buffers_the_next_forward_changes_and_shares_the_rest():
    from dtrain import dcp
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).train()
    state = dcp.sharded_state(model, torch.optim.Adam(model.parameters()))
    copied = dcp.rank_0_buffers(model, state["model"])
    before = {k: v.clone() for k, v in copied.items()}
    model(torch.randn(8, 3))  # the next step's forward, beside the copy
    assert_same_weights(copied, before, rtol=0, atol=0)  # running statistics as they were at the save
    assert copied["0.weight"].data_ptr() == model[0].weight.data_ptr()  # the optimizer's update waits for these


@pytest.mark.slow  # in CI's slow tier: the default tier stays under 10 minutes
def test_an_asynchronous_save_trains_the_same_records_its_stall_and_completes_before_the_end(tmp_path):
    common = (*SMALL, "dist.strategy=fsdp", "checkpoint.every_n_steps=5", "checkpoint.keep_last=3")
    sync = run_cli(tmp_path / "sync", *common, nproc=2, timeout=300)
    both = run_cli(tmp_path / "async", *common, "checkpoint.async_save=true", nproc=2, timeout=300)
    assert sync.code == 0 and both.code == 0, (sync, both)
    assert_same_weights(weights(sync.dir), weights(both.dir), rtol=0, atol=0)
    folder = both.dir / "checkpoints"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["best", "latest", "step-00000040", "step-00000045", "step-00000050"], names  # nothing half-done
    assert all(ckpt.load(folder / n)["step"] == int(n[5:]) for n in names if n.startswith("step-"))
    assert all("checkpoint_stall_s" in m for m in both.metrics)


@pytest.mark.slow
def test_a_sharded_checkpoint_is_used_like_a_file_evaluate_predict_export_and_init_from(tmp_path):
    run = run_cli(tmp_path / "run", *SMALL, "dist.strategy=fsdp", nproc=2, timeout=300)
    assert run.code == 0, run
    best = run.dir / "checkpoints" / "best"
    assert best.is_file() and (run.dir / "checkpoints" / best.read_text()).is_dir()
    from dtrain import api
    model = api.load_model(best)  # consolidated in this one process
    assert_same_weights(model.net.state_dict(), weights(run.dir))
    assert api.evaluate(best)["acc"] == pytest.approx(run.summary["test_acc"], abs=1e-6)
    out = tmp_path / "weights.pt"
    proc = subprocess.run([sys.executable, "-m", "dtrain.export", f"ckpt={best}", "format=state_dict", f"out={out}"],
                          cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert_same_weights(torch.load(out, weights_only=True), weights(run.dir), rtol=0, atol=0)  # a plain file
    again = run_cli(tmp_path / "again", *SMALL, f"model.init_from={run.dir / 'checkpoints' / 'latest'}",
                    "trainer.max_steps=1", "optim.lr=1e-9")
    assert again.code == 0, again


@pytest.mark.slow
def test_a_partial_or_damaged_distributed_checkpoint_is_set_aside_and_the_previous_one_used(tmp_path):
    common = (*SMALL, "dist.strategy=fsdp", "checkpoint.every_n_steps=10", "checkpoint.keep_last=3")
    first = run_cli(tmp_path / "run", *common, nproc=2, target=(FAULTS,), env={"DTRAIN_FAULT": "raise:1:35"},
                    timeout=300)
    assert first.code != 0
    folder = tmp_path / "run" / "checkpoints"
    (folder / "step-00000030" / "state.pt").write_bytes(b"half a file")  # damaged
    (folder / ".step-00000040.tmp").mkdir()  # a write that never finished
    run = run_cli(tmp_path / "run", *common, nproc=2, timeout=300)
    # The newest good one before it is the end of epoch 1, step 25.
    assert run.code == 0 and "resumed from" in run.out and "step-00000025:" in run.out, run
    assert "moved it to step-00000030.corrupt" in run.out
    assert (folder / "step-00000030.corrupt").is_dir() and not (folder / ".step-00000040.tmp").exists()


@pytest.mark.slow
def test_meta_init_never_materialises_the_whole_model_on_a_rank(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(MATERIALISED)
    run = run_cli(tmp_path / "run", "model=mlp3", "trainer.max_steps=2", "logger=none", "dist.strategy=fsdp",
                  "dist.fsdp.meta_init=true", "checkpoint.enabled=false", nproc=2, target=(str(probe),), timeout=300,
                  env={"PYTHONPATH": str(ROOT)})
    assert run.code == 0, run
    full = 784 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10  # mlp3's parameters
    for rank in (0, 1):
        made = json.loads((run.dir / f"made-rank{rank}.json").read_text())
        assert made["largest"] < 784 * 128 and made["total"] < 0.6 * full, made  # never the whole model


MATERIALISED = '''
import json, os, sys
from pathlib import Path
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from dtrain import build

class Tally(TorchDispatchMode):  # every tensor created on a real device while the model is made
    def __init__(self):
        super().__init__()
        self.sizes = []
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.startswith(("empty", "zeros", "ones", "full")) and isinstance(out, torch.Tensor) \\
                and out.device.type != "meta":  # a sharded (DTensor) result allocates only its local shard
            self.sizes.append(out.to_local().numel() if hasattr(out, "to_local") else out.numel())
        return out

original = build.make_model
def tallied(*args, **kwargs):  # the model as the config names it, before the strategy shards it
    with Tally() as tally:
        made = original(*args, **kwargs)
    run_dir = Path(sys.argv[-1].split("=", 1)[1])  # hydra.run.dir=..., the last argument
    (run_dir / f"made-rank{os.environ['RANK']}.json").write_text(
        json.dumps({"largest": max(tally.sizes, default=0), "total": sum(tally.sizes)}))
    return made
build.make_model = tallied

from dtrain.cli import main
main()
'''


COUNTED = '''
import sys
from pathlib import Path
import torch
from dtrain import build, trainer

made, forwards = build.make_model, [0]
def counting(*args, **kwargs):  # LeNet's fc1 (a block: a Linear) counts the forwards it runs with autograd on
    model = made(*args, **kwargs)
    forward = model.fc1.forward
    def counted(*a, **k):
        forwards[0] += torch.is_grad_enabled()  # training and backward's recomputation; not evaluation
        return forward(*a, **k)
    model.fc1.forward = counted
    return model
build.make_model = counting

fit = trainer.Trainer.fit
def fit_and_write(self):
    result = fit(self)
    (self.run.path / f"forwards-rank{self.world.rank}.txt").write_text(str(forwards[0]))
    return result
trainer.Trainer.fit = fit_and_write

from dtrain.cli import main
sys.exit(main())
'''


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_activation_checkpointing_recomputes_without_changing_the_losses(tmp_path, strategy):
    probe = tmp_path / "counted.py"
    probe.write_text(COUNTED)
    common = (*CONV, f"dist.strategy={strategy}", "checkpoint.format=file", "trainer.log_every_n_steps=1")
    plain = run_cli(tmp_path / "plain", *common, nproc=2, timeout=300, target=(str(probe),))
    recomputed = run_cli(tmp_path / "ac", *common, "trainer.activation_checkpointing=true", nproc=2, timeout=300,
                         target=(str(probe),))
    assert plain.code == 0 and recomputed.code == 0, (plain, recomputed)
    # 12 steps: a block runs its forward once per step, and once more in each backward when it recomputes.
    for run, per_step in ((plain, 1), (recomputed, 2)):
        assert [int((run.dir / f"forwards-rank{r}.txt").read_text()) for r in (0, 1)] == [12 * per_step] * 2, run
    assert recomputed.summary["val_loss"] == pytest.approx(plain.summary["val_loss"], abs=1e-6)
    assert_same_weights(weights(plain.dir), weights(recomputed.dir))
