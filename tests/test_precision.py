"""Mixed precision, compile, memory format, TF32, host synchronisation and DDP options: what the speed
features promise, checked on the CPU."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
import torch

from conftest import make_trainer, params, run_cli

SMALL = ("trainer.max_steps=6", "logger=none", "checkpoint.enabled=false")


def one_backward(trainer) -> None:
    x, y = next(iter(trainer.loaders.train))
    with torch.autocast("cpu", dtype=torch.float16, enabled=trainer.cfg.trainer.precision.value == "fp16"):
        loss = trainer.task.loss(trainer.net(x).float(), y)
    trainer.scaler.scale(loss).backward()


def test_fp16_scales_the_loss_and_skips_a_step_whose_gradients_overflow(tmp_path, quiet_logs):
    trainer = make_trainer(tmp_path, "trainer.precision=fp16", "trainer.device=cpu", *SMALL)
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() == 65536.0
    before = params(trainer.model)
    one_backward(trainer)
    next(trainer.model.parameters()).grad[0, 0] = float("inf")  # an overflow in one gradient
    trainer.optimizer_step()
    assert all(torch.equal(before[k], v) for k, v in params(trainer.model).items())  # the step was skipped
    assert trainer.scaler.get_scale() == 32768.0  # and the scale lowered
    one_backward(trainer)
    trainer.optimizer_step()
    assert not all(torch.equal(before[k], v) for k, v in params(trainer.model).items())  # a finite step applies


def test_gradient_clipping_sees_unscaled_gradients_under_fp16(tmp_path, monkeypatch, quiet_logs):
    norms = []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda ps, max_norm: norms.append(real_clip(ps, max_norm)))
    for precision in ("fp32", "fp16"):
        trainer = make_trainer(tmp_path / precision, f"trainer.precision={precision}", "trainer.grad_clip=1e9", *SMALL)
        one_backward(trainer)
        trainer.optimizer_step()
    fp32, fp16 = (float(n) for n in norms)
    assert fp16 == pytest.approx(fp32, rel=0.05)  # scaled, it would be 65536 times larger


def test_the_scaler_state_is_checkpointed_and_restored(tmp_path, quiet_logs):
    first = make_trainer(tmp_path, "trainer.precision=fp16", "trainer.epochs=1")
    first.scaler.scale(torch.ones(()))  # the scale exists once a loss was scaled
    first.scaler.update(1024.0)  # as if earlier overflows had lowered it
    first.fit()
    first.close()
    saved = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)["scaler"]
    assert saved["scale"] == first.scaler.get_scale() and saved["scale"] < 65536.0
    resumed = make_trainer(tmp_path, "trainer.precision=fp16", "trainer.epochs=1")
    resumed.checkpointer.resume(resumed.saved, "auto")
    assert resumed.scaler.get_scale() == saved["scale"]


def test_bf16_autocasts_the_forward_pass_but_computes_loss_and_metrics_in_fp32(tmp_path, quiet_logs):
    trainer = make_trainer(tmp_path, "trainer.precision=bf16", *SMALL)
    seen = []
    trainer.model.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    trainer.fit()
    trainer.close()
    assert torch.bfloat16 in seen and not trainer.scaler.is_enabled()
    assert all(isinstance(v, float) for k, v in trainer.last_metrics.items() if k.endswith(("loss", "acc")))


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compile_trains_the_same_model_to_the_same_loss(tmp_path):
    runs = [run_cli(tmp_path / name, "trainer.max_steps=30", "trainer.epochs=1",
                    f"trainer.compile={name == 'compiled'}", timeout=300) for name in ("eager", "compiled")]
    assert all(r.code == 0 for r in runs), runs
    eager, compiled = (r.summary["val_loss"] for r in runs)
    assert compiled == pytest.approx(eager, rel=1e-3)


def test_channels_last_keeps_convolutions_in_nhwc_and_trains_like_nchw(tmp_path, quiet_logs):
    trained = {}
    for fmt in ("true", "false"):
        trainer = make_trainer(tmp_path / fmt, "model=lenet", f"trainer.channels_last={fmt}", *SMALL)
        conv = [m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d)][-1]  # 6 channels in
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) == (fmt == "true")
        trainer.fit()
        trainer.close()
        trained[fmt] = params(trainer.model)
    for k in trained["true"]:
        torch.testing.assert_close(trained["true"][k], trained["false"][k], rtol=1e-4, atol=1e-5)


def test_tf32_follows_the_config(tmp_path, quiet_logs):
    before = torch.backends.cuda.matmul.fp32_precision
    try:
        make_trainer(tmp_path / "a", "trainer.tf32=false", *SMALL)
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        make_trainer(tmp_path / "b", *SMALL)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


def test_the_stop_check_runs_every_sync_every_steps_and_the_loss_is_read_only_on_log_steps(tmp_path, monkeypatch,
                                                                                           quiet_logs):
    # One process, the collective replaced by a recorder: how often the loop asks. The real agreement of two
    # ranks is test_two_ranks_agree_on_a_stop_every_n_steps_and_read_the_loss_only_on_log_steps.
    from dtrain import trainer as trainer_module
    checks, logged = [], []
    monkeypatch.setattr(trainer_module.w, "max_over_ranks", lambda value, device: checks.append(value) or value)
    trainer = make_trainer(tmp_path, "trainer.max_steps=40", "trainer.log_every_n_steps=20", "logger=none")
    trainer.sync_every = 10  # what trainer.sync_every_n_steps gives under DDP
    monkeypatch.setattr(trainer, "log_step", logged.append)
    trainer.fit()
    trainer.close()
    assert len(checks) == 4 and len(logged) == 2


COUNTING = """
import os, sys
from pathlib import Path

sys.path.insert(0, os.environ["DTRAIN_TESTS"])
import faults  # DTRAIN_FAULT: the fault injection of tests/faults.py
from dtrain import checkpointer, launch, trainer, world


def note(what, value):  # one line per call, in <COUNT_DIR>/<what>-rank<R>.txt
    with open(Path(os.environ["COUNT_DIR"], f"{what}-rank{os.environ['RANK']}.txt"), "a") as f:
        f.write(f"{value}\\n")


start_vote, log_step, save_on_stop = world.start_max_over_ranks, trainer.Trainer.log_step, \\
    checkpointer.Checkpointer.save_on_stop
world.start_max_over_ranks = lambda value, device: note("votes", value) or start_vote(value, device)
trainer.Trainer.log_step = lambda self, loss, **extra: note("loss", self.progress.step) or log_step(self, loss, **extra)
checkpointer.Checkpointer.save_on_stop = lambda self, t, step, stop: note("stop", step) or save_on_stop(self, t, step,
                                                                                                       stop)
if sys.argv[1:2] == ["--launch"]:  # dtrain.launch, every worker running this file
    launch.WORKER = ("-u", __file__)
    sys.exit(launch.main(sys.argv[2:]))
faults.install()
from dtrain.cli import main
sys.exit(main())
"""


def test_two_ranks_agree_on_a_stop_every_n_steps_and_read_the_loss_only_on_log_steps(tmp_path):
    from conftest import FAULTS, Live
    script = tmp_path / "counting.py"
    script.write_text(COUNTING)
    job = Live(str(script), "--launch", "launcher.nproc_per_node=2", "model=mlp3", "data=synthetic",
               "data.shape=[1,12,12]", "data.num_samples=1001", "data.batch_size=32", "trainer.epochs=3",
               "trainer.sync_every_n_steps=10", "trainer.log_every_n_steps=7", "logger.plots=false",
               f"hydra.run.dir={tmp_path / 'run'}",
               env={"DTRAIN_FAULT": "term:1:23", "COUNT_DIR": str(tmp_path), "DTRAIN_TESTS": str(Path(FAULTS).parent)})
    assert job.finish(timeout=180) == 75, job  # SIGTERM reached rank 1 alone, after its step 23

    def lines(what: str, rank: int) -> list[int]:
        return [int(v) for v in (tmp_path / f"{what}-rank{rank}.txt").read_text().split()]
    # Each rank put its signal to the vote after steps 10, 20 and 30 only (15: rank 1's SIGTERM), ...
    assert (lines("votes", 0), lines("votes", 1)) == ([0, 0, 0], [0, 0, int(signal.SIGTERM)]), job
    # ... and both stopped after step 30, rank 0 though it never got a signal.
    assert (lines("stop", 0), lines("stop", 1)) == ([30], [30]), job
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-00000030.pt"
    assert lines("loss", 0) == lines("loss", 1) == [7, 14, 21, 28]  # the loss read on log steps only


def test_a_non_finite_loss_stops_training_with_what_to_do(tmp_path, quiet_logs):
    trainer = make_trainer(tmp_path, "trainer.log_every_n_steps=1", *SMALL)
    net = trainer.net

    class Poisoned(torch.nn.Module):  # what the step calls for the outputs, made NaN
        def forward(self, x):
            return net(x) * float("nan")

    trainer.step.call = Poisoned()
    with pytest.raises(FloatingPointError, match=r"the training loss is nan at epoch 1 step 1 \(rank 0\); lower "
                                                 r"optim.lr, set trainer.grad_clip, or find the first bad batch"):
        trainer.fit()
    trainer.close()


# -- DDP options, on two real processes ------------------------------------------------------------

UNUSED = """
import math
from torch import nn

class WithUnused(nn.Module):  # a head that never takes part in the loss
    def __init__(self, input_shape, num_outputs):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_outputs))
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        return self.body(x)
"""


@pytest.mark.slow  # in CI's slow tier: the default tier stays under 10 minutes
def test_a_model_with_unused_parameters_gets_the_option_that_fixes_it_and_trains_with_it(tmp_path):
    (tmp_path / "with_unused.py").write_text(UNUSED)  # a user's model, in a config folder of theirs
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "with_unused.yaml").write_text("_target_: with_unused.WithUnused\n")
    common = ("--config-dir", str(tmp_path / "conf"), "model=with_unused", "trainer.max_steps=4", "logger=none",
              "checkpoint.enabled=false")
    env = {"PYTHONPATH": str(tmp_path)}
    failed = run_cli(tmp_path / "a", *common, nproc=2, env=env, timeout=120)
    assert failed.code != 0, failed  # raw torchrun exits 1 for any failed worker (dtrain-launch keeps the 2)
    assert failed.err.count("dtrain: error: the model has parameters that received no gradient") == 1
    assert "set dist.find_unused_parameters=true" in failed.err
    fixed = run_cli(tmp_path / "b", *common, "dist.find_unused_parameters=true", "dist.bucket_cap_mb=1",
                    "dist.gradient_as_bucket_view=true", nproc=2, env=env, timeout=120)
    assert fixed.code == 0, fixed
