"""Promises of the docs that had no test: FSDP's `shard` and `reshard_after_forward`, the epoch cadence of
checkpoints, TensorBoard's purge on resume, wandb's init timeout, a user's data splits and class discovery,
`load_model` into a given instance, `peak_rss_bytes`, `DTRAIN_DATA_ROOT`, and activation checkpointing's
recomputation. Each is checked against something dtrain does not compute itself (the run's own files read
back by an independent reader, the process's /proc counters, counts kept inside a user's model, or the
numbers a data set was built with)."""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import compose_dcfg, make_config, make_trainer, run_cli

# A user's package: a model made of blocks of class Block, data sets, and probes (callbacks), written into the
# test's folder and imported from there, in this process or (PYTHONPATH) in the processes a test starts.
NETS = '''
"""A user's model (blocks of class Block), data sets and probing callbacks for tests/test_promises.py."""
import json
import math
import resource

import torch
from torch import nn
from torch.utils.data import Dataset


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.calls = 0  # forwards in training mode (validation runs in eval mode and is not counted)

    def forward(self, x):
        if self.training:
            self.calls += 1
        return torch.relu(self.lin(x))


class Stack(nn.Module):
    def __init__(self, input_shape, num_classes, width=16, depth=3):
        super().__init__()
        self.inp = nn.Linear(math.prod(input_shape), width)
        self.blocks = nn.Sequential(*[Block(width) for _ in range(depth)])
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.blocks(self.inp(x.flatten(1))))


class FsdpProbe:
    """Per rank: which modules are FSDP units, how each parameter is held at rest, and whether the blocks'
    parameters are sharded (DTensor) or still gathered (a plain Parameter) when the model's forward returns."""

    def on_fit_start(self, trainer):
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
        model, self.after_forward = trainer.model, []
        self.units = sorted(type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule))
        self.at_rest = {n: {"type": type(p).__name__, "shape": list(p.shape),
                            "local": list(p.to_local().shape) if isinstance(p, DTensor) else None}
                        for n, p in model.named_parameters()}

        def hook(module, args, out):  # registered after FSDP's own post-forward hooks, so runs after them
            if module.training:
                self.after_forward.append(sorted({type(b.lin.weight).__name__ for b in module.blocks}))
        model.register_forward_hook(hook)

    def on_fit_end(self, trainer, summary):
        (trainer.run.path / f"fsdp-rank{trainer.world.rank}.json").write_text(json.dumps(
            {"units": self.units, "at_rest": self.at_rest, "after_forward": self.after_forward}))


def status_kib(field):
    """A line of /proc/self/status in KiB (VmRSS: resident now, VmHWM: its peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


class Allocate:
    """Allocates (and touches) `megabytes` MB at the end of the first epoch, and frees it; records the
    process's resident memory before training and its peak when training ends, read from /proc."""

    def __init__(self, megabytes=0):
        self.megabytes, self.done = megabytes, False

    def on_fit_start(self, trainer):
        self.start = status_kib("VmRSS") * 1024

    def on_train_epoch_end(self, trainer, metrics):
        if self.megabytes and not self.done:
            block = torch.ones(self.megabytes * 1_000_000 // 4)  # float32, every page written
            assert float(block[-1]) == 1.0
            del block
            self.done = True

    def on_fit_end(self, trainer, summary):  # runs before dtrain's own Memory callback
        (trainer.run.path / "memory-probe.json").write_text(json.dumps(
            {"rss_at_start": self.start, "hwm_at_end": status_kib("VmHWM") * 1024,
             "maxrss_at_end": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


class Items(Dataset):
    """(input, label) pairs whose input says its label (learnable); labels cycle 0..num_labels-1. Counts
    its reads."""

    def __init__(self, n, num_labels=3, seed=0, shape=(1, 6, 6)):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % num_labels
        self.x = torch.randn(n, *shape, generator=g) * 0.3 + self.y.view(-1, *[1] * len(shape)).float()
        self.reads = 0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], int(self.y[i])


class WithClasses(Items):  # labels 0..2, but five named classes: 5 outputs
    classes = ["a", "b", "c", "d", "e"]


class WithNumClasses(Items):  # labels 0..2, but num_classes 4: 4 outputs
    num_classes = 4


class WithTargets(Items):  # labels 0..5 listed in `targets`: 6 outputs, no pass over the items
    @property
    def targets(self):
        return self.y.tolist()


def with_classes():
    return WithClasses(120, num_labels=3)


def with_num_classes():
    return WithNumClasses(120, num_labels=3)


def with_targets():
    return WithTargets(120, num_labels=6)


def with_nothing():  # labels 0..6 found by one pass over the training items: 7 outputs
    return Items(140, num_labels=7)


def three_splits():
    return {"train": Items(200, seed=0), "val": Items(37, seed=1), "test": Items(23, seed=2)}
'''

SYNTH = ("data=synthetic", "data.num_samples=256", "data.shape=[1,12,12]", "data.batch_size=32",
         "data.eval_batch_size=64", "logger.plots=false", "seed=3")
STACK = ("model._target_=promise_nets.Stack", "model.name=stack", "~model.dropout")


@pytest.fixture
def nets(tmp_path, monkeypatch):
    """The user's package `promise_nets`, importable here and (PYTHONPATH=its folder) in child processes."""
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / "promise_nets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(folder))
    import promise_nets
    return promise_nets


def fit(tmp_path: Path, *overrides: str):
    """An in-process trainer of the composed config, trained; (trainer, summary)."""
    trainer = make_trainer(tmp_path, *overrides)
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    return trainer, summary


def metrics_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- 1. FSDP: dist.fsdp.shard and dist.fsdp.reshard_after_forward, on 2 ranks -----------------------------

@pytest.mark.parametrize("shard,reshard,units,after_forward", [
    # The default tier runs the case a no-op of either key fails (FSDP2 itself reshards after forward).
    ("[Block]", "false", ["FSDPBlock"] * 3 + ["FSDPStack"], "Parameter"),
    pytest.param("[Block]", "true", ["FSDPBlock"] * 3 + ["FSDPStack"], "DTensor", marks=pytest.mark.slow),
    pytest.param("null", "true", ["FSDPStack"], "DTensor", marks=pytest.mark.slow),
], ids=["blocks-keep", "blocks-reshard", "root-alone"])
def test_fsdp_shards_the_named_classes_on_their_own_and_frees_gathered_parameters_after_forward_only_if_asked(
        tmp_path, nets, shard, reshard, units, after_forward):
    run = run_cli(tmp_path / "run", *STACK, *SYNTH, "trainer.max_steps=3", "logger=none", "checkpoint.enabled=false",
                  "dist.strategy=fsdp", f"dist.fsdp.shard={shard}", f"dist.fsdp.reshard_after_forward={reshard}",
                  "+callbacks.probe._target_=promise_nets.FsdpProbe", nproc=2, timeout=300,
                  env={"PYTHONPATH": str(tmp_path / "pkg")})
    assert run.code == 0, run
    probes = [json.loads((run.dir / f"fsdp-rank{r}.json").read_text()) for r in (0, 1)]
    for probe in probes:
        assert probe["units"] == units  # each Block its own unit (3), then the root; else the root alone
        # At rest every parameter is a DTensor holding its half of dim 0 on this rank.
        assert {p["type"] for p in probe["at_rest"].values()} == {"DTensor"}
        # After the model's forward in training, the blocks' parameters are sharded again (freed) with
        # reshard_after_forward=true, and still the gathered whole Parameter with false.
        assert probe["after_forward"] == [[after_forward]] * 3, probe["after_forward"]
    full = nets.Stack((1, 12, 12), 10)
    for name, param in full.named_parameters():
        locals_ = [probe["at_rest"][name]["local"] for probe in probes]
        assert probes[0]["at_rest"][name]["shape"] == list(param.shape)
        assert locals_[0][1:] == locals_[1][1:] == list(param.shape[1:])
        assert locals_[0][0] + locals_[1][0] == param.shape[0] and locals_[0][0] == -(-param.shape[0] // 2), name


# -- 2. checkpoint.every_n_epochs ---------------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("every,saved_epochs", [(2, [2, 4, 5]), (3, [3, 5]), (0, [5])])
def test_checkpoints_are_saved_exactly_at_the_epochs_that_are_multiples_of_every_n_epochs_and_at_the_end(
        tmp_path, quiet_logs, every, saved_epochs):
    fit(tmp_path, *SYNTH, "trainer.epochs=5", f"checkpoint.every_n_epochs={every}", "checkpoint.keep_last=100")
    step_at = {m["epoch"]: m["step"] for m in metrics_of(tmp_path)}  # each epoch's last step, as logged
    assert sorted(step_at) == [1, 2, 3, 4, 5] and len(set(step_at.values())) == 5
    files = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*.pt"))
    assert files == [f"step-{step_at[e]:08d}.pt" for e in saved_epochs]
    for e in saved_epochs:  # each holds the end of its epoch
        state = torch.load(tmp_path / "checkpoints" / f"step-{step_at[e]:08d}.pt", weights_only=True)
        assert state["progress"] == {"epoch": e, "step": step_at[e], "samples_in_epoch": 0}


# -- 3. TensorBoard purges the steps a resumed run logs again ------------------------------------------------

def scalar_steps(folder: Path, tag: str, purge: bool) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0}, purge_orphaned_data=purge)
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_tensorboard_purges_the_steps_a_resumed_run_logs_again(tmp_path, quiet_logs):
    common = (*SYNTH, "trainer.epochs=2", "logger.tensorboard=true", "trainer.log_every_n_steps=1")
    first = make_trainer(tmp_path, *common)
    step = first.optimizer_step

    def crash_after_step_9():  # a checkpoint at the end of epoch 1 (step 6); steps 7 and 8 logged after it
        step()
        if first.progress.step == 9:
            raise RuntimeError("crash")

    first.optimizer_step = crash_after_step_9
    with pytest.raises(RuntimeError, match="crash"):
        first.fit()
    first.close()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000006.pt"
    assert scalar_steps(tmp_path / "tensorboard", "step/loss", purge=True) == list(range(1, 9))

    # A resumed run is a later process; here the same one, so let its event file's name (which starts with
    # the second it is made in) sort after the first one's, as TensorBoard reads them in name order.
    time.sleep(1.1)
    resumed, summary = fit(tmp_path, *common)  # resume=auto: from step 6, logs steps 7.. again
    assert resumed.progress.step == summary["steps"] == 12
    raw = scalar_steps(tmp_path / "tensorboard", "step/loss", purge=False)  # every event on disk
    assert sorted(raw) == sorted([*range(1, 9), *range(7, 13)])  # the resumed run did log 7 and 8 a second time
    # What TensorBoard shows: each step once, the resumed run's, as its purge marker (at step 7) asks.
    assert scalar_steps(tmp_path / "tensorboard", "step/loss", purge=True) == list(range(1, 13))
    assert scalar_steps(tmp_path / "tensorboard", "val/acc", purge=True) == [6, 12]


# -- 4. logger.wandb_init_timeout_s reaches wandb ---------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("given,expected", [(None, 60.0), ("17", 17.0)], ids=["default", "given"])
def test_wandb_init_timeout_s_is_the_init_timeout_wandb_is_started_with(tmp_path, quiet_logs, monkeypatch,
                                                                      given, expected):
    import wandb
    monkeypatch.setenv("WANDB_MODE", "disabled")  # never the network: a disabled run, created locally
    seen = []
    real_init = wandb.init

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", spy)
    timeout = [f"logger.wandb_init_timeout_s={given}"] if given else []
    fit(tmp_path, *SYNTH, "trainer.max_steps=2", "logger.wandb=true", "checkpoint.enabled=false", *timeout)
    assert len(seen) == 1 and seen[0]["mode"] == "disabled"
    assert seen[0]["settings"].init_timeout == expected  # wandb's own default would be 90


# -- 5. a user's data: the splits as given, and how the classes are found ---------------------------------------

def accuracy(model: torch.nn.Module, ds) -> float:
    with torch.no_grad():
        model.eval()
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        y = torch.tensor([ds[i][1] for i in range(len(ds))])
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.unit
def test_a_data_factorys_train_val_and_test_splits_are_used_as_given(tmp_path, quiet_logs, nets):
    trainer, summary = fit(tmp_path, "data._target_=promise_nets.three_splits", "data.name=three", "data.batch_size=20",
                           "data.eval_batch_size=16", "trainer.epochs=2", "logger.plots=false")
    made = nets.three_splits()  # the same items (seeded), to check against
    loaders = trainer.loaders
    # Nothing carved out of train for validation, and neither val nor test resized.
    assert (len(loaders.train.dataset), len(loaders.val.dataset), len(loaders.test.dataset)) == (200, 37, 23)
    assert summary["val_samples"] == 37
    assert torch.equal(loaders.val.dataset[36][0], made["val"][36][0])
    assert torch.equal(loaders.test.dataset[22][0], made["test"][22][0])
    # The reported metrics are the trained model's on exactly those items (counted here, independently).
    assert summary["val_acc"] == pytest.approx(accuracy(trainer.model, made["val"]), abs=1e-6)
    assert summary["test_acc"] == pytest.approx(accuracy(trainer.model, made["test"]), abs=1e-6)


@pytest.mark.unit
@pytest.mark.parametrize("factory,outputs,names,full_pass", [
    ("with_classes", 5, ["a", "b", "c", "d", "e"], False),
    ("with_num_classes", 4, None, False),
    ("with_targets", 6, None, False),
    ("with_nothing", 7, None, True),
])
def test_the_number_of_outputs_comes_from_classes_num_classes_targets_or_one_pass_over_the_labels(
        tmp_path, quiet_logs, nets, factory, outputs, names, full_pass):
    trainer = make_trainer(tmp_path, f"data._target_=promise_nets.{factory}", "data.name=mine", "logger=none")
    trainer.close()
    assert trainer.splits.out == outputs and trainer.splits.class_names == names
    x = torch.stack([trainer.splits.train[i][0] for i in range(4)])
    assert trainer.model(x).shape == (4, outputs)  # the model is built with that many outputs
    train = trainer.splits.train
    reads = train.dataset.reads  # the data set's own count of items read while dtrain set itself up
    assert (reads >= len(train)) == full_pass, reads  # only a data set with none of the three is read through


# -- 6. load_model into a given instance ---------------------------------------------------------------------

def test_load_model_loads_the_weights_into_the_given_instance_and_predicts_as_the_trained_model(
        tmp_path, quiet_logs, nets):
    import dtrain
    torch.manual_seed(0)
    trained = nets.Stack((1, 6, 6), 3, width=24)  # not what the recorded _target_ alone would rebuild (width 16)
    summary = dtrain.fit(trained, nets.three_splits(), overrides=[
        "trainer.epochs=2", "data.batch_size=20", "logger.plots=false", f"hydra.run.dir={tmp_path / 'run'}"])
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000020.pt"  # the end: 2 epochs x 200 / 20
    assert summary["steps"] == 20 and ckpt.exists()
    torch.manual_seed(1)
    fresh = nets.Stack((1, 6, 6), 3, width=24)
    assert not torch.equal(fresh.head.weight, trained.head.weight)
    loaded = dtrain.load_model(ckpt, model=fresh)
    assert loaded.net is fresh  # the given instance, its weights now the trained ones
    for (name, a), b in zip(trained.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    x = nets.three_splits()["test"].x
    with torch.no_grad():
        expected = trained.eval()(x).softmax(1)
    torch.testing.assert_close(loaded.predict(x), expected)
    assert summary["test_acc"] == pytest.approx((loaded.predict(x).argmax(1) == nets.three_splits()["test"].y)
                                                .float().mean().item(), abs=1e-6)


# -- 7. peak_rss_bytes ---------------------------------------------------------------------------------------

# Linux keeps a process's ru_maxrss across execve and starts a vforked child (Python's subprocess) at its
# parent's peak, so a run is started the way a shell starts it: forked from a small shell, not from pytest.
FROM_A_SHELL = ["/bin/sh", "-c", f'"{sys.executable}" "$@"; exit $?', "sh"]
# A launcher that holds (and touches) 1.5 GB, then execs the run in its place, as a notebook, a wrapper
# script or a test runner holding that much would start it.
FROM_A_LARGE_PROCESS = [sys.executable, "-c", "import os, sys; big = bytearray(1500 * 2**20); big[::4096] = "
                        "b'x' * len(big[::4096]); os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"]


def peak_rss_run(tmp_path: Path, launcher: list[str], megabytes: int) -> tuple[int, dict]:
    run = run_cli(tmp_path / "run", *SYNTH, "trainer.epochs=1", "logger=none", "checkpoint.enabled=false",
                  "+callbacks.alloc._target_=promise_nets.Allocate", f"+callbacks.alloc.megabytes={megabytes}",
                  launcher=launcher, env={"PYTHONPATH": str(tmp_path / "pkg")})
    assert run.code == 0, run
    return run.summary["peak_rss_bytes"], json.loads((run.dir / "memory-probe.json").read_text())


def test_peak_rss_bytes_is_the_processs_peak_resident_memory_including_an_allocation_during_training(
        tmp_path, nets):
    megabytes = 200
    peak, probe = peak_rss_run(tmp_path, FROM_A_SHELL, megabytes)
    assert isinstance(peak, int) and 100e6 < peak < 64e9
    # The peak counts the tensor made during training on top of what the process held before it...
    assert peak >= probe["rss_at_start"] + 0.95 * megabytes * 1e6, (peak, probe)
    # ...and is the kernel's high-water mark of this process (VmHWM in /proc, read just before dtrain reads it).
    assert probe["hwm_at_end"] <= peak <= probe["hwm_at_end"] + 8 * 2**20, (peak, probe)


def test_peak_rss_bytes_is_the_runs_own_peak_even_when_started_from_a_process_holding_more_memory(tmp_path, nets):
    peak, probe = peak_rss_run(tmp_path, FROM_A_LARGE_PROCESS, 0)
    assert probe["hwm_at_end"] < 1400 * 2**20  # the run itself never held the launcher's 1.5 GB
    assert probe["hwm_at_end"] <= peak <= probe["hwm_at_end"] + 8 * 2**20, (peak, probe)


# -- 8. DTRAIN_DATA_ROOT ----------------------------------------------------------------------------------------

def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file as MNIST ships it: magic (0, 0, 0x08 = ubyte, rank), big-endian sizes, the bytes."""
    path.write_bytes(struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
                     + array.astype(np.uint8).tobytes())


def test_data_root_defaults_to_the_dtrain_data_root_environment_variable(tmp_path, monkeypatch):
    from dtrain import data
    from dtrain import world as w
    raw = tmp_path / "datasets" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 50), ("t10k", 30)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    monkeypatch.delenv("DTRAIN_DATA_ROOT", raising=False)
    assert make_config("data=cifar10").data.kwargs["root"] == "data"  # unset: ./data
    monkeypatch.setenv("DTRAIN_DATA_ROOT", str(tmp_path / "datasets"))
    for name in ("mnist", "cifar10"):
        assert make_config(f"data={name}").data.kwargs["root"] == str(tmp_path / "datasets"), name
    assert compose_dcfg("data=csv").data.root == str(tmp_path / "datasets")  # (csv also needs data.path)
    assert make_config("data=mnist", "data.root=/elsewhere").data.kwargs["root"] == "/elsewhere"  # a key wins
    splits = data.build(make_config("data=mnist", "data.download=false").data, w.World())
    assert (len(splits.train), len(splits.val), len(splits.test)) == (45, 5, 30)  # the files written above
    assert int(splits.test[7][1]) == 7


# -- 9. activation checkpointing recomputes --------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("named", [True, False], ids=["blocks-named", "whole-model"])
def test_activation_checkpointing_runs_each_blocks_forward_twice_per_step_and_keeps_the_losses(
        tmp_path, quiet_logs, nets, named):
    common = (*STACK, *SYNTH, "trainer.max_steps=3", "logger=none", "checkpoint.enabled=false",
              *(["model.blocks=[Block]"] if named else []))
    plain, plain_summary = fit(tmp_path / "plain", *common)
    ac, ac_summary = fit(tmp_path / "ac", *common, "trainer.activation_checkpointing=true")
    for trainer, per_step in ((plain, 1), (ac, 2)):
        calls = [block.calls for block in trainer.model.blocks]  # training forwards, counted by the blocks
        assert calls == [per_step * 3] * 3, calls
    assert ac_summary["val_loss"] == pytest.approx(plain_summary["val_loss"], abs=1e-6)
    for a, b in zip(plain.model.parameters(), ac.model.parameters()):
        torch.testing.assert_close(a, b)

