"""Config is composed from conf/ against the typed schema and every bad value is caught once, up front,
with a message that names the key, the value and what is allowed."""

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from dtrain import config, validate
from dtrain import world as w
from dtrain.app import CONF_DIR
from dtrain.errors import ConfigError
from conftest import make_config

pytestmark = pytest.mark.unit  # in-process and fast: `pytest -m unit`


def test_the_default_config_is_the_mlp_on_the_bundled_mnist_sample():
    cfg = make_config()
    assert (cfg.model.name, cfg.data.name, cfg.optim.name, cfg.sched.name) == ("mlp", "mnist_sample", "adam", "none")
    assert cfg.name == "mlp-mnist_sample" and cfg.resume == "auto" and cfg.trainer.precision == "fp32"


@pytest.mark.parametrize("group,options", [
    ("model", ["mlp", "mlp3", "lenet", "convnet", "linear", "resnet18"]),
    ("data", ["mnist_sample", "mnist", "cifar10", "synthetic", "regression", "imagefolder"]),
    ("optim", ["sgd", "adam", "adamw", "rmsprop"]),
    ("sched", ["none", "step", "cosine", "onecycle"]),
    ("debug", ["none", "fast", "overfit", "anomaly"]),
    ("logger", ["default", "none"]),
])
def test_every_group_option_composes_and_validates(group, options):
    for option in options:
        cfg = make_config(f"{group}={option}")
        if group in ("model", "data", "optim", "sched", "debug", "logger"):
            assert getattr(cfg, group).name == option


@pytest.mark.parametrize("override,message", [
    ("optim.lr=0", "optim.lr=0.0 is not allowed: must be > 0"),
    ("optim.lr=-0.1", "optim.lr=-0.1 is not allowed: must be > 0"),
    ("trainer.epochs=0", "trainer.epochs=0 is not allowed: must be > 0"),
    ("trainer.epochs=-2", "trainer.epochs=-2"),
    ("data.batch_size=0", "data.batch_size=0 is not allowed: must be > 0"),
    ("data.eval_batch_size=-1", "data.eval_batch_size=-1"),
    ("trainer.max_steps=0", "trainer.max_steps=0 is not allowed: -1 (no limit) or > 0"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0"),
    ("trainer.device=tpu", "trainer.device='tpu' is not allowed: auto, cpu, cuda or cuda:N"),
    ("trainer.label_smoothing=1.5", "trainer.label_smoothing=1.5"),
    ("trainer.grad_clip=-1", "trainer.grad_clip=-1.0 is not allowed: must be >= 0"),
    ("dist.timeout_s=0", "dist.timeout_s=0.0"),
    ("data.val_fraction=1.0", "data.val_fraction=1.0 is not allowed: must be in (0, 1)"),
    ("data.num_workers=-1", "data.num_workers=-1"),
    ("data=synthetic data.shape=[0,4]", "data.shape=[0, 4]"),
    ("optim.betas=[0.9]", "optim.betas=[0.9] is not allowed: two numbers in [0, 1)"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last=0"),
    ("sched=onecycle sched.warmup_steps=5", "sched=onecycle warms up by itself"),
    ("data.std=[0]", "data.std=[0.0] is not allowed: one number per channel, all > 0"),
])
def test_a_bad_value_is_rejected_naming_the_key_the_value_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as err:
        make_config(*override.split())
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override,error", [
    ("trainer.epochz=3", ConfigCompositionException),  # unknown key
    ("trainer.epochs=abc", ConfigCompositionException),  # wrong type
    ("model=nope", ConfigCompositionException),  # unknown option
    ("trainer.precision=fp8", ConfigCompositionException),  # not a member of the enum
    ("dist.backend=mpi", ConfigCompositionException),
    ("checkpoint.mode=maximum", ConfigCompositionException),
])
def test_hydra_rejects_unknown_keys_wrong_types_and_unknown_options(override, error):
    with pytest.raises(error):
        make_config(override)


@pytest.mark.parametrize("override,message", [
    ("+trainer.epoch=3", "trainer.epoch: no such key (did you mean trainer.epochs?"),
    ("+optim.momentom=0.9", "optim.momentom: no such key (did you mean optim.momentum?"),
    ("+lr=0.1", "lr: no such key"),
])
def test_a_misspelt_key_added_with_plus_is_refused_naming_it(override, message):
    with pytest.raises(ConfigError) as err:
        make_config(override)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_global_batch_must_split_evenly_across_ranks():
    cfg = make_config("data.batch_size=63")
    validate.check_world(cfg, w.World())
    with pytest.raises(ConfigError, match="data.batch_size=63 .* divide evenly by the world size 2"):
        validate.check_world(cfg, w.World(world_size=2))


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_each_mixed_precision_this_pytorch_runs_on_the_cpu_is_accepted_and_really_autocasts(precision, dtype):
    from dtrain.strategy.base import autocast
    cfg = make_config(f"trainer.precision={precision}", "trainer.device=cpu")
    world = w.from_env("cpu", env={})
    validate.check_world(cfg, world)  # raises if refused
    with autocast(world.device, cfg.trainer.precision):
        assert torch.nn.Linear(4, 4)(torch.ones(2, 4)).dtype == dtype


def test_a_precision_the_device_cannot_autocast_to_is_refused_naming_it(monkeypatch):
    import contextlib
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: contextlib.nullcontext())  # PyTorch's silent fallback
    cfg = make_config("trainer.precision=fp16", "trainer.device=cpu")
    with pytest.raises(ConfigError, match="trainer.precision='fp16' is not allowed: this PyTorch cannot autocast "
                                          "to fp16 on cpu; use trainer.precision=fp32"):
        validate.check_world(cfg, w.from_env("cpu", env={}))


def test_the_help_text_lists_the_values_of_enum_keys():
    text = config.choices_help()
    for line in ("trainer.precision: fp32, bf16, fp16", "dist.backend: auto, nccl, gloo",
                 "checkpoint.mode: auto, min, max"):
        assert line in text


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_validates(name):
    cfg = make_config(f"experiment={name}")
    data = "char" if cfg.data.name == "text" else cfg.data.name  # char_gpt: character-level text
    assert name.startswith(data) and cfg.model.name in name


def test_an_experiment_overrides_groups_and_values_and_the_command_line_still_wins():
    cfg = make_config("experiment=cifar10_resnet18", "trainer.epochs=2")
    assert (cfg.model.name, cfg.data.name, cfg.optim.name, cfg.sched.name) == ("resnet18", "cifar10", "sgd", "cosine")
    assert (cfg.optim.lr, cfg.trainer.precision, cfg.trainer.epochs) == (0.2, "bf16", 2)


def test_debug_fast_shrinks_an_experiment_to_one_epoch_of_two_batches():
    cfg = make_config("experiment=cifar10_lenet", "debug=fast")
    assert (cfg.model.name, cfg.trainer.epochs, cfg.debug.limit_batches, cfg.checkpoint.enabled) == \
        ("lenet", 1, 2, False)


def test_the_run_name_follows_the_chosen_model_and_data():
    assert make_config("model=lenet", "data=synthetic").name == "lenet-synthetic"
