"""Optimizers as research code sets them up: parameter groups by name (a backbone at a lower learning rate, a
head at the base rate), with every optimizer, implementation and schedule, and an optimizer class of one's
own by `_target_`; each contract broken in one line."""

import pytest
import torch

from conftest import crash_after_step, make_config, make_trainer, run_cli
from dtrain import checkpoint as ckpt
from dtrain import optim
from dtrain.errors import ConfigError

JOB = ("model=mlp3", "data=synthetic", "data.num_samples=256", "data.shape=[1,8,8]", "data.batch_size=32",
       "trainer.epochs=1", "logger=none", "checkpoint.enabled=false", "seed=3")
GROUPS = 'optim.param_groups=[{params: "fc[12].*", lr: 1e-7}]'  # the backbone; fc3 is the head


def changes(before: dict, model) -> dict[str, float]:
    return {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name,implementation", [
    ("adam", "fused"), ("adamw", "foreach"), ("sgd", "loop"), ("rmsprop", "foreach"), ("adagrad", "fused")])
def test_a_backbone_group_at_a_tiny_learning_rate_barely_moves_while_the_head_trains(tmp_path, quiet_logs, name,
                                                                                    implementation):
    t = make_trainer(tmp_path, *JOB, f"optim={name}", "optim.lr=0.01", f"optim.implementation={implementation}",
                     GROUPS)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    assert [g["lr"] for g in t.optimizer.param_groups] == [0.01, 1e-7]  # the default group, then the backbone
    t.fit()
    moved = changes(before, t.model)
    assert max(moved[k] for k in ("fc1.weight", "fc2.weight")) < 1e-4 * moved["fc3.weight"], moved
    assert moved["fc3.weight"] > 1e-3 and optim.implementation_of(t.optimizer) == implementation


@pytest.mark.unit
@pytest.mark.parametrize("sched", ["cosine", "onecycle", "step"])
def test_each_group_keeps_its_ratio_to_the_base_learning_rate_under_every_schedule(sched):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    cfg = make_config("optim=sgd", "optim.lr=0.1", f"sched={sched}", 'optim.param_groups=[{params: "0.*", lr: 0.01}]')
    opt = optim.build_optimizer(model, cfg.optim)
    scheduler = optim.build_scheduler(opt, cfg.sched, cfg.optim.lr, total_steps=20, steps_per_epoch=5)
    for _ in range(7):
        opt.step()
        scheduler.step()
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs[1] == pytest.approx(lrs[0] / 10, rel=1e-9)


def test_a_run_with_parameter_groups_resumes_exactly(tmp_path, quiet_logs, monkeypatch):
    job = (*JOB, "trainer.epochs=2", "checkpoint.enabled=true", "checkpoint.every_n_steps=5", "optim=adamw",
           "sched=cosine", 'optim.param_groups=[{params: "fc1.*", lr: 1e-4, weight_decay: 0.0}]')
    reference = make_trainer(tmp_path / "reference", *job)
    reference.fit()
    restore = crash_after_step(monkeypatch, 7)
    with pytest.raises(RuntimeError, match="crash"):
        make_trainer(tmp_path / "run", *job).fit()
    restore()
    resumed = make_trainer(tmp_path / "run", *job)
    resumed.fit()
    assert resumed.optimizer.param_groups[1]["weight_decay"] == 0.0
    for (name, a), b in zip(reference.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


def test_an_optimizer_class_of_ones_own_takes_its_arguments_and_the_implementation_it_has(tmp_path, quiet_logs):
    t = make_trainer(tmp_path, *JOB, "+optim._target_=torch.optim.NAdam", "+optim.momentum_decay=0.01",
                     "optim.betas=[0.8,0.99]", "optim.lr=0.005", GROUPS)
    assert type(t.optimizer) is torch.optim.NAdam and t.optimizer.defaults["momentum_decay"] == 0.01
    assert t.optimizer.defaults["betas"] == (0.8, 0.99) and t.optimizer.defaults["lr"] == 0.005
    assert optim.implementation_of(t.optimizer) == "foreach"  # NAdam has foreach, no fused kernel
    before = t.model.fc3.weight.detach().clone()
    summary = t.fit()
    assert summary["optimizer_implementation"] == "foreach" and summary["steps"] == 6
    assert (t.model.fc3.weight.detach() - before).abs().max() > 1e-3  # it stepped


@pytest.mark.unit
@pytest.mark.parametrize("overrides,message", [
    (['optim.param_groups=[{params: "backbone.*", lr: 0.1}]'],
     r"optim.param_groups\[0\].params='backbone.\*' matches no parameter of the model, whose names are like "
     r"fc1.weight, fc1.bias"),
    (['optim.param_groups=[{params: "fc1.*", lrr: 0.1}]'],
     r"optim.param_groups\[0\]: 'lrr' is not an option of Adam \(its options: lr, betas"),
    (["+optim._target_=torch.optim.NAdam", "+optim.momentum_decayy=0.1"],
     r"optim: torch.optim.NAdam takes no argument 'momentum_decayy'"),
    (["+optim._target_=torch.optim.Adagrad", "optim.momentum=0.5"], r"optim: torch.optim.Adagrad takes no argument "
                                                                     r"'momentum'"),
    (["+optim.foo=1"], r"optim.foo: no such key \(dtrain's adam takes none; an optimizer class of your own"),
    (["+optim._target_=torch.optim.NAdam", "optim.implementation=fused"],
     r"optim.implementation=fused: torch.optim.NAdam takes no fused= argument"),
])
def test_an_optimizer_setting_that_cannot_work_is_one_line(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        cfg = make_config(*JOB, *overrides)
        optim.build_optimizer(torch.nn.Sequential(__import__("collections").OrderedDict(
            fc1=torch.nn.Linear(2, 2), fc2=torch.nn.Linear(2, 2))), cfg.optim)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_parameter_groups_train_the_same_under_fsdp_as_under_ddp(tmp_path):
    job = (*JOB, "logger=default", "logger.plots=false", "checkpoint.enabled=true", "checkpoint.format=file",
           "trainer.max_steps=6", GROUPS)
    ddp = run_cli(tmp_path / "ddp", *job, nproc=2, timeout=300)
    fsdp = run_cli(tmp_path / "fsdp", *job, "dist.strategy=fsdp", nproc=2, timeout=300)
    assert ddp.code == 0, ddp
    assert fsdp.code == 0, fsdp
    a, b = (ckpt.weights(ckpt.load(r.dir / "checkpoints" / "latest")) for r in (ddp, fsdp))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
