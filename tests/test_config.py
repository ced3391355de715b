"""Config is composed from conf/ against the typed schema and every bad value is caught once, up front,
with a message that names the key, the value and what is allowed."""

import pytest
from hydra.errors import ConfigCompositionException

from dtrain import config
from dtrain.config import ConfigError
from conftest import make_config


def test_the_default_config_is_the_mlp_on_the_bundled_mnist_sample():
    cfg = make_config()
    assert (cfg.model.name, cfg.data.name, cfg.optim.name, cfg.sched.name) == ("mlp", "mnist_sample", "adam", "none")
    assert cfg.name == "mlp-mnist_sample" and cfg.resume == "auto" and cfg.trainer.precision == "32"


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
    ("trainer.precision=fp8", "trainer.precision='fp8' is not allowed: choose one of 32, bf16, fp16"),
    ("trainer.device=tpu", "trainer.device='tpu' is not allowed: auto, cpu, cuda or cuda:N"),
    ("trainer.label_smoothing=1.5", "trainer.label_smoothing=1.5"),
    ("trainer.grad_clip=-1", "trainer.grad_clip=-1.0 is not allowed: must be >= 0"),
    ("dist.backend=mpi", "dist.backend='mpi' is not allowed: choose one of auto, nccl, gloo"),
    ("dist.timeout_s=0", "dist.timeout_s=0.0"),
    ("data.val_fraction=1.0", "data.val_fraction=1.0 is not allowed: must be in (0, 1)"),
    ("data.num_workers=-1", "data.num_workers=-1"),
    ("data.shape=[0,4]", "data.shape=[0, 4]"),
    ("optim.betas=[0.9]", "optim.betas=[0.9] is not allowed: two numbers in [0, 1)"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last=0"),
    ("checkpoint.monitor=acc", "checkpoint.monitor='acc' is not allowed: choose one of auto, val_acc, val_loss"),
    ("trainer.precision=fp16 trainer.device=cpu", "fp16 needs a CUDA device"),
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
])
def test_hydra_rejects_unknown_keys_wrong_types_and_unknown_options(override, error):
    with pytest.raises(error):
        make_config(override)


def test_the_global_batch_must_split_evenly_across_ranks():
    cfg = make_config("data.batch_size=63")
    config.check_batch_split(cfg, 1)
    with pytest.raises(ConfigError, match="data.batch_size=63 .* divide evenly by the world size 2"):
        config.check_batch_split(cfg, 2)


def test_the_run_name_follows_the_chosen_model_and_data():
    assert make_config("model=lenet", "data=synthetic").name == "lenet-synthetic"
