"""The loop trains every workload, repeats exactly, and its knobs (schedules, accumulation, clipping,
debug modes) do what they say. In-process on CPU with the real composed config."""

import json
import math

import pytest
import torch

from dtrain import data, optim
from dtrain.tasks import TASKS
from dtrain.errors import ConfigError
from conftest import make_config, make_trainer, params

FAST = ("checkpoint.enabled=false", "logger=none")
SYNTH = ("data=synthetic", "data.num_samples=256", "data.batch_size=32", "data.eval_batch_size=64")


DIGITS = ("data=mnist_sample", "data.eval_batch_size=500")  # the bundled MNIST digits: 9,000 train, 1,000 val
LEARNS = {  # each classifier, a few seconds of training on data it can learn in them
    "mlp": (*DIGITS, "data.batch_size=64", "trainer.max_steps=60"),
    "mlp3": (*DIGITS, "data.batch_size=64", "trainer.max_steps=60"),
    "lenet": (*DIGITS, "data.batch_size=64", "trainer.max_steps=100"),
    "convnet": (*DIGITS, "data.batch_size=32", "trainer.max_steps=40"),
    # ResNet-18 costs too much per 28x28 image here; on data=synthetic a fixed random linear map of the input
    # decides the label, learnable from 800 samples when the input is small: 3 channels of 2x2, 2 classes.
    "resnet18": ("data=synthetic", "data.shape=[3,2,2]", "data.num_classes=2", "data.num_samples=1000",
                 "data.batch_size=32", "data.eval_batch_size=100", "trainer.epochs=3"),
}


@pytest.mark.parametrize("model", sorted(LEARNS))
def test_each_classifier_learns_well_above_chance_on_samples_it_never_trained_on(tmp_path, quiet_logs, model):
    t = make_trainer(tmp_path, f"model={model}", *LEARNS[model], "optim=adam", "optim.lr=1e-3", *FAST)
    summary = t.fit()
    t.close()
    split, loader = ("test", t.loaders.test) if t.loaders.test is not None else ("val", t.loaders.val)
    outs, labels = [], []
    t.model.eval()
    with torch.no_grad():  # the trained model's outputs on the held-out split, scored here
        for x, y in loader:
            outs.append(t.model(x).float())
            labels.append(y)
    out, y = torch.cat(outs), torch.cat(labels)
    acc, loss = (out.argmax(1) == y).double().mean().item(), torch.nn.functional.cross_entropy(out, y).item()
    # A model that learns nothing predicts independently of the input: its accuracy is at most the commonest
    # class's share (about 0.12 on the digits, 0.58 on ResNet's test split) and its cross-entropy at least the
    # entropy of the class shares (ln 10 = 2.30; 0.68). It scores that within noise (checked with optim.lr=1e-12);
    # a working one clears both bounds widely on every seed tried (seeds 0-5 on the digits: accuracy >= 0.86,
    # loss <= 0.47; seeds 0-7 for ResNet-18: >= 0.86, <= 0.36).
    share = torch.bincount(y).double() / len(y)
    chance, chance_loss = share.max().item(), -(share[share > 0] * share[share > 0].log()).sum().item()
    assert acc >= (1 + chance) / 2, f"{split} accuracy {acc:.3f}: not well above chance {chance:.3f}"
    assert loss <= 0.6 * chance_loss, f"{split} loss {loss:.3f}: not well below chance {chance_loss:.3f}"
    assert summary[f"{split}_acc"] == pytest.approx(acc, abs=1e-6)  # and dtrain reports what the model does
    assert summary[f"{split}_loss"] == pytest.approx(loss, rel=1e-4) and summary["world_size"] == 1


def test_mlp_on_the_bundled_mnist_sample_reaches_94_percent(tmp_path, quiet_logs):
    t = make_trainer(tmp_path, *FAST)
    summary = t.fit()
    assert summary["val_acc"] >= 0.94 and summary["epochs"] == 5
    assert summary["optimizer_implementation"] == "fused"  # Adam on a CPU: PyTorch has the kernel


def test_linear_regression_recovers_the_known_coefficients(tmp_path, quiet_logs):
    t = make_trainer(tmp_path, "model=linear", "data=regression", "optim=sgd", "optim.lr=0.05",
                     "optim.weight_decay=0", "trainer.epochs=10", *FAST)
    summary = t.fit()
    coef, bias = data.regression_truth(t.cfg.data.kwargs["shape"], t.cfg.data.split_seed)
    layer = t.model.linear
    assert torch.allclose(layer.weight.detach().T, coef, atol=0.02)
    assert torch.allclose(layer.bias.detach(), bias, atol=0.02)
    assert summary["val_loss"] < 0.02 and "val_acc" not in summary  # MSE of noise 0.1 is 0.01


def test_the_same_seed_repeats_a_cpu_run_exactly(tmp_path, quiet_logs):
    runs = []
    for i in range(2):
        t = make_trainer(tmp_path / str(i), "model=lenet", *SYNTH, "trainer.epochs=2", "seed=7", *FAST)
        t.fit()
        runs.append((params(t.model), t.last_metrics))
    assert all(torch.equal(runs[0][0][k], runs[1][0][k]) for k in runs[0][0])
    assert {k: v for k, v in runs[0][1].items() if "time" not in k and "per_sec" not in k} == \
        {k: v for k, v in runs[1][1].items() if "time" not in k and "per_sec" not in k}


def test_a_different_seed_gives_different_weights(tmp_path, quiet_logs):
    a = make_trainer(tmp_path / "a", *SYNTH, "trainer.epochs=1", "seed=1", *FAST)
    b = make_trainer(tmp_path / "b", *SYNTH, "trainer.epochs=1", "seed=2", *FAST)
    assert not torch.equal(a.model.fc1.weight, b.model.fc1.weight)


def test_gradient_accumulation_matches_the_equivalent_large_batch(tmp_path, quiet_logs):
    common = ("model=mlp", *SYNTH, "data.shape=[16]", "optim=sgd", "optim.momentum=0", "trainer.max_steps=4", *FAST)
    big = make_trainer(tmp_path / "big", *common, "data.batch_size=32")
    small = make_trainer(tmp_path / "acc", *common, "data.batch_size=8", "trainer.accumulate_grad_batches=4")
    big.fit(), small.fit()
    assert big.progress.step == small.progress.step == 4
    for k, v in params(big.model).items():
        torch.testing.assert_close(params(small.model)[k], v, rtol=1e-5, atol=1e-6)


def test_gradient_clipping_bounds_each_sgd_update(tmp_path, quiet_logs):
    t = make_trainer(tmp_path, *SYNTH, "optim=sgd", "optim.momentum=0", "optim.weight_decay=0",
                     "optim.lr=1.0", "trainer.grad_clip=0.01", "trainer.max_steps=1", *FAST)
    before = torch.cat([p.detach().flatten().clone() for p in t.model.parameters()])
    t.fit()
    after = torch.cat([p.detach().flatten() for p in t.model.parameters()])
    assert (after - before).norm() <= 0.01 + 1e-6


def test_label_smoothing_raises_the_loss_of_confident_predictions():
    loss = TASKS["classification"].loss
    out, y = torch.tensor([[10.0, 0.0]]), torch.tensor([0])
    assert loss(out, y, 0.2) > loss(out, y, 0.0)


@pytest.mark.parametrize("name,lr", [("sgd", 0.1), ("adam", 1e-2), ("adamw", 1e-2), ("rmsprop", 1e-3),
                                     ("adagrad", 0.1)])
def test_every_optimizer_trains(tmp_path, quiet_logs, name, lr):
    # 10 classes: chance is 10% accuracy and a loss of ln 10 = 2.30; each optimizer must get far past both.
    t = make_trainer(tmp_path, f"optim={name}", f"optim.lr={lr}", "data=synthetic", "data.num_samples=2048",
                     "data.shape=[16]", "data.batch_size=32", "data.eval_batch_size=256", "trainer.epochs=4", *FAST)
    t.fit()
    assert t.last_metrics["train_loss"] < 0.35 * math.log(10) and t.last_metrics["val_acc"] > 0.7


def test_sgd_takes_momentum_nesterov_and_weight_decay():
    cfg = make_config("optim=sgd", "optim.nesterov=true", "optim.weight_decay=0.1").optim
    opt = optim.build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)
    group = opt.param_groups[0]
    assert (group["nesterov"], group["momentum"], group["weight_decay"]) == (True, 0.9, 0.1)


def lrs(*overrides, total=100, per_epoch=10):
    cfg = make_config(*overrides)
    opt = optim.build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg.optim)
    sched = optim.build_scheduler(opt, cfg.sched, cfg.optim.lr, total, per_epoch)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_no_schedule_keeps_the_lr_and_counts_steps_as_lambdalr_does():
    assert lrs("optim.lr=0.5", "sched=none", total=20) == [0.5] * 20
    cfg = make_config("sched=none")
    opt = optim.build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg.optim)
    constant, general = (optim.build_scheduler(opt, cfg.sched, 0.5, 20, 10),
                         torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0))
    for _ in range(7):
        opt.step()
        constant.step()
        general.step()
    assert isinstance(constant, optim.Constant)
    assert {k: v for k, v in constant.state_dict().items() if k != "lr_lambdas"} == \
        {k: v for k, v in general.state_dict().items() if k != "lr_lambdas"}  # checkpoints load either way


def test_no_schedule_resumed_from_another_schedule_returns_to_the_base_lr():
    cfg = make_config("optim.lr=0.5", "sched=cosine")
    opt = optim.build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg.optim)
    cosine = optim.build_scheduler(opt, cfg.sched, 0.5, 20, 10)
    for _ in range(10):
        opt.step()
        cosine.step()
    assert opt.param_groups[0]["lr"] < 0.5
    constant = optim.build_scheduler(opt, make_config("sched=none").sched, 0.5, 20, 10)
    constant.load_state_dict(cosine.state_dict())
    assert opt.param_groups[0]["lr"] == constant.get_last_lr()[0] == 0.5  # as LambdaLR's next step sets it


def test_linear_warmup_rises_to_the_base_lr():
    lr = lrs("optim.lr=1.0", "sched=cosine", "sched.warmup_steps=10", "sched.warmup_start_factor=0.1")
    assert lr[0] == pytest.approx(0.1) and lr[5] == pytest.approx(0.55) and lr[10] == pytest.approx(1.0)


def test_cosine_decays_to_min_lr():
    lr = lrs("optim.lr=1.0", "sched=cosine", "sched.min_lr=0.01")
    assert lr[0] == pytest.approx(1.0) and lr[50] == pytest.approx(0.505) and lr[-1] < 0.02


def test_step_decays_every_step_size_epochs():
    lr = lrs("optim.lr=1.0", "sched=step", "sched.step_size=2", "sched.gamma=0.5")
    assert (lr[19], lr[20], lr[40]) == pytest.approx((1.0, 0.5, 0.25))


def test_onecycle_peaks_at_the_optimizer_lr():
    lr = lrs("optim=sgd", "optim.lr=1.0", "sched=onecycle", "sched.pct_start=0.3")
    assert max(lr) == pytest.approx(1.0, rel=1e-3) and lr.index(max(lr)) in (29, 30) and lr[-1] < 0.01


def test_max_steps_stops_mid_epoch(tmp_path, quiet_logs):
    t = make_trainer(tmp_path, *SYNTH, "trainer.max_steps=3", "trainer.epochs=5", *FAST)
    summary = t.fit()
    assert summary["steps"] == 3 and summary["epochs"] == 1  # the epoch it trained in, though not to its end
    assert t.progress.samples_in_epoch == 3 * 32  # the position is kept, so a resume continues from it


def test_debug_fast_runs_a_couple_of_batches_and_writes_no_checkpoint(tmp_path, quiet_logs):
    t = make_trainer(tmp_path, "debug=fast")
    summary = t.fit()
    assert summary["steps"] == 2 and summary["epochs"] == 1
    assert not (tmp_path / "checkpoints").exists()


def test_debug_overfit_memorises_its_fixed_batches(tmp_path, quiet_logs):
    t = make_trainer(tmp_path, "debug=overfit", "logger=none")
    t.fit()
    assert t.last_metrics["train_acc"] >= 0.99 and t.last_metrics["val_acc"] >= 0.99


def test_debug_anomaly_stops_at_the_first_non_finite_loss_naming_step_and_batch(tmp_path, quiet_logs):
    t = make_trainer(tmp_path, "debug=anomaly", "model=linear", "data=regression", "optim=sgd",
                     "optim.lr=1e6", *FAST)
    with pytest.raises(FloatingPointError, match=r"the training loss is (nan|inf) at epoch 1 step \d+ batch \d+ "
                                                 r".*debug=anomaly stopped at this first bad batch"):
        t.fit()


def test_accumulating_more_batches_than_an_epoch_has_is_a_config_error(tmp_path, quiet_logs):
    with pytest.raises(ConfigError, match="trainer.accumulate_grad_batches=100"):
        make_trainer(tmp_path, *SYNTH, "trainer.accumulate_grad_batches=100", *FAST)


def test_the_run_folder_holds_metrics_per_epoch_and_a_summary(tmp_path, quiet_logs):
    t = make_trainer(tmp_path, *SYNTH, "trainer.epochs=2", "checkpoint.enabled=false")
    t.fit()
    t.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    for key in ("epoch", "step", "train_loss", "val_loss", "val_acc", "lr", "samples_per_sec", "epoch_time_s"):
        assert key in lines[0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("val_loss", "val_acc", "test_acc", "wall_time_s", "world_size", "device", "samples_per_sec",
                "config_name"):
        assert key in summary


def test_bf16_autocast_trains_on_the_cpu(tmp_path, quiet_logs):
    t = make_trainer(tmp_path, "model=lenet", *SYNTH, "data.shape=[1,28,28]", "trainer.precision=bf16",
                     "trainer.epochs=3", "checkpoint.enabled=false")
    seen = []
    t.model.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    summary = t.fit()
    t.close()
    losses = [json.loads(line)["train_loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert torch.bfloat16 in seen and losses[-1] < losses[0] and summary["precision"] == "bf16"


def test_nesterov_without_momentum_is_a_config_error():
    with pytest.raises(ConfigError, match="optim.nesterov=true needs optim.momentum > 0"):
        make_config("optim=sgd", "optim.nesterov=true", "optim.momentum=0")


# -- the optimizer's implementation: the fastest PyTorch has, the same numbers whichever runs --------------

@pytest.mark.parametrize("name,single,sharded", [
    ("adam", "fused", "fused"), ("adamw", "fused", "fused"), ("sgd", "fused", "foreach"),
    ("adagrad", "fused", "foreach"), ("rmsprop", "foreach", "foreach"),
])
def test_auto_picks_the_fused_kernel_wherever_pytorch_has_one(name, single, sharded):
    cfg = make_config(f"optim={name}").optim
    assert optim.implementation(cfg, "cpu", sharded=False) == single
    assert optim.implementation(cfg, "cpu", sharded=True) == sharded  # FSDP2's DTensors: adam/adamw only
    built = optim.build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg, "cpu")
    assert optim.implementation_of(built) == single


@pytest.mark.parametrize("name", ["sgd", "adagrad"])
def test_a_model_with_sparse_gradients_gets_the_loop_the_one_implementation_that_takes_them(name):
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    assert optim.makes_sparse_gradients(torch.nn.Sequential(embedding, torch.nn.Linear(4, 2)))
    cfg = make_config(f"optim={name}", "optim.weight_decay=0").optim  # PyTorch decays no sparse gradient
    opt = optim.build_optimizer(embedding.parameters(), cfg, "cpu", sparse=optim.makes_sparse_gradients(embedding))
    assert optim.implementation_of(opt) == "loop"
    embedding(torch.tensor([1, 2])).sum().backward()
    opt.step()  # fused kernels raise here, and foreach SGD with momentum
    with pytest.raises(ConfigError, match="sparse gradients"):
        optim.implementation(make_config(f"optim={name}", "optim.implementation=fused").optim, "cpu", False, True)


@pytest.mark.parametrize("overrides,where", [
    (("optim=rmsprop", "optim.implementation=fused"), "no fused rmsprop for any device"),
    (("optim=sgd", "optim.implementation=fused", "dist.strategy=fsdp"),
     "no fused sgd for dist.strategy=fsdp's sharded parameters"),
])
def test_a_fused_kernel_pytorch_lacks_is_refused_at_the_edge(overrides, where):
    with pytest.raises(ConfigError, match=f"optim.implementation=fused: PyTorch has {where}; use "):
        make_config(*overrides)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "adagrad", "rmsprop"])
def test_every_implementation_reaches_the_same_weights(name):
    def train(impl: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        opt = optim.build_optimizer(net.parameters(), make_config(f"optim={name}", "optim.lr=0.01",
                                                                  "optim.weight_decay=0.01",
                                                                  f"optim.implementation={impl}").optim)
        assert optim.implementation_of(opt) == impl
        data = torch.Generator().manual_seed(1)
        for _ in range(30):
            x, y = torch.randn(16, 8, generator=data), torch.randint(0, 3, (16,), generator=data)
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return [p.detach().clone() for p in net.parameters()]

    impls = ["loop", "foreach"] + (["fused"] if optim.OPTIMIZERS[name].fused else [])
    reference = train("loop")
    torch.manual_seed(0)
    assert not torch.allclose(reference[0], torch.nn.Linear(8, 16).weight)  # it trained
    for impl in impls[1:]:
        for a, b in zip(train(impl), reference):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_never_overrides_the_configured_implementation():
    param = torch.nn.Parameter(torch.ones(2))
    saved = optim.build_optimizer([param], make_config("optim.implementation=loop").optim)
    param.grad = torch.ones(2)
    saved.step()
    resumed = optim.build_optimizer([param], make_config().optim)
    resumed.load_state_dict(optim.own_implementation(resumed, saved.state_dict()))
    assert optim.implementation_of(resumed) == "fused" and resumed.param_groups[0]["fused"]
    assert resumed.state[param]["exp_avg"].equal(saved.state[param]["exp_avg"])


def test_adagrad_takes_its_learning_rate_decay_and_weight_decay():
    cfg = make_config("optim=adagrad", "optim.lr_decay=0.01", "optim.weight_decay=0.1").optim
    opt = optim.build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.Adagrad)
    assert (group["lr"], group["lr_decay"], group["weight_decay"], group["eps"]) == (0.01, 0.01, 0.1, 1e-10)


def test_an_l1_penalty_shrinks_the_weights_and_is_reported_apart_from_the_loss(tmp_path, quiet_logs):
    common = ("model=mlp", *SYNTH, "data.shape=[16]", "optim=sgd", "optim.weight_decay=0", "trainer.epochs=3",
              "checkpoint.enabled=false", "logger.plots=false", "trainer.log_every_n_steps=1")
    plain = make_trainer(tmp_path / "plain", *common)
    plain.fit()
    sparse = make_trainer(tmp_path / "l1", *common, "optim.l1=0.05")
    sparse.fit()
    sparse.close()
    norm = lambda t: sum(p.abs().sum().item() for p in t.model.parameters())  # noqa: E731
    assert norm(sparse) < 0.8 * norm(plain)
    last = json.loads((tmp_path / "l1" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["l1_penalty"] == pytest.approx(0.05 * norm(sparse), rel=1e-5)
    assert "l1_penalty" not in plain.last_metrics
    # train_loss stays the data's loss: the same model and batches give the same cross-entropy with l1 on
    assert last["train_loss"] < math.log(10)


def test_early_stopping_stops_after_patience_epochs_without_improvement_and_saves_the_final_checkpoint(
        tmp_path, quiet_logs):
    common = (*SYNTH, "trainer.epochs=10", "trainer.early_stopping.patience=2", "logger.plots=false",
              "checkpoint.monitor=val_loss", "trainer.early_stopping.min_delta=100")  # nothing beats the first
    t = make_trainer(tmp_path, *common)
    summary = t.fit()
    t.close()
    assert summary["epochs"] == 3 and summary["stopped_early"] is True
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step-{summary['steps']:08d}.pt"
    again = make_trainer(tmp_path, *common)  # the stopped run is finished: rerunning it trains nothing
    assert again.fit() == summary
    again.close()
    patient = make_trainer(tmp_path, *(o.replace("patience=2", "patience=4") for o in common),
                           "checkpoint.allow_config_change=true")
    assert patient.fit()["epochs"] == 5  # given more patience, the stopped run goes on until it runs out again
    patient.close()


def test_a_dtrain_checkpoint_can_be_the_starting_weights_of_a_new_run(tmp_path, quiet_logs):
    first = make_trainer(tmp_path / "a", *SYNTH, "trainer.max_steps=2", "logger=none")
    first.fit()
    first.close()
    second = make_trainer(tmp_path / "b", *SYNTH, f"model.init_from={tmp_path / 'a' / 'checkpoints' / 'best.pt'}",
                          "optim=sgd", "logger=none")  # another optimizer: a new run, not a resume
    assert all(torch.equal(v, first.model.state_dict()[k]) for k, v in second.model.state_dict().items())
    second.close()


def test_early_stopping_waits_while_the_metric_improves():
    from types import SimpleNamespace

    from dtrain.callbacks import EarlyStopping

    def verdicts(stop, values):
        trainer = SimpleNamespace(should_stop=False, progress=SimpleNamespace(epoch=0),
                                  cfg=SimpleNamespace(trainer=SimpleNamespace(epochs=10)))
        out = []
        for v in values:
            stop.on_validation_end(trainer, {"acc": v})
            out.append(trainer.should_stop)
        return out

    stop = EarlyStopping("val_acc", patience=2, min_delta=0.01, higher_is_better=True)
    assert verdicts(stop, (0.5, 0.6, 0.605, 0.7, 0.7, 0.69)) == [False, False, False, False, False, True]
    assert stop.best == 0.7 and verdicts(EarlyStopping("val_acc", 0, 0.0, True), (0.1, 0.1)) == [False, False]


def test_dropout_is_an_option_of_the_mlps_and_cnns_that_adds_no_weights(tmp_path, quiet_logs):
    from dtrain import models
    plain = models.build(models.builtin("lenet"), "classification", (3, 32, 32), 10, "test")
    dropped = models.build(models.builtin("lenet", dropout=0.5), "classification", (3, 32, 32), 10, "test")
    assert plain.state_dict().keys() == dropped.state_dict().keys()
    x = torch.randn(8, 3, 32, 32)
    dropped.train()
    assert not torch.equal(dropped(x), dropped(x))  # a new mask each forward in training
    dropped.eval()
    assert torch.equal(dropped(x), dropped(x))
    # An option is a keyword argument of the model's _target_; a model that does not take it says so.
    with pytest.raises(ConfigError, match=r"model: dtrain.models.resnet18 takes no argument 'dropout' \(it takes "
                                          r"input_shape, num_outputs\)"):
        make_trainer(tmp_path, "model=resnet18", *SYNTH, "+model.dropout=0.5")
    with pytest.raises(ConfigError, match="model: dtrain.models.lenet takes no argument 'batchnorm'"):
        make_trainer(tmp_path, "model=lenet", *SYNTH, "+model.batchnorm=false")
    no_bn = models.build(models.builtin("convnet", batchnorm=False), "classification", (3, 32, 32), 10, "test")
    assert not any("bn" in k for k in no_bn.state_dict())
