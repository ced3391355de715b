"""Every tutorial job is one `experiment=` away, with the tutorial's exact recipe, and the tutorials' own
model classes load what dtrain trains (and dtrain starts from what they trained)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import tutorials
from conftest import make_config, make_trainer
from dtrain import api
from dtrain.app import CONF_DIR
from dtrain.errors import ConfigError, DataError
from test_data import write_cifar10, write_mnist

EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
BOSTON = ["CRIM", "ZN", "INDUS", "CHAS", "NOX", "RM", "AGE", "DIS", "RAD", "TAX", "PTRATIO", "B", "LSTAT"]


def write_boston(path: Path, rows: int = 60) -> None:
    """A CSV file laid out as the Boston-housing tutorials read it: a header, 13 features, MEDV last."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 13)) * rng.uniform(0.5, 50, 13) + rng.uniform(0, 300, 13)
    medv = x @ rng.normal(size=13) / 100 + 22
    lines = [",".join(BOSTON + ["MEDV"])] + [",".join(f"{v:.4f}" for v in (*r, t)) for r, t in zip(x, medv)]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Small files in every official format the experiments read: MNIST IDX, CIFAR-10 batches, a CSV."""
    root = tmp_path_factory.mktemp("data")
    write_mnist(root)
    write_cifar10(root, per_batch=12, n_test=12)
    write_boston(root / "boston_housing.csv")
    return root


# The tutorials' recipes as the issue lists them: (model, model.batchnorm, data, optimizer, lr, momentum,
# batch, epochs, normalised)
RECIPES = {
    "cifar10_lenet_tutorial": ("lenet", None, "cifar10", "sgd", 0.001, 0.9, 100, 10, False),
    "mnist_mlp_tutorial": ("mlp", None, "mnist", "sgd", 0.01, 0.0, 64, 10, False),
    "mnist_mlp3_tutorial": ("mlp3", None, "mnist", "adam", 1e-3, None, 64, 10, False),
    "mnist_mlp3_sgd_tutorial": ("mlp3", None, "mnist", "sgd", 0.01, 0.9, 64, 10, False),
    "cifar10_convnet_tutorial": ("convnet", False, "cifar10", "adam", 1e-3, None, 64, 10, False),
    "csv_linear_boston_tutorial": ("linear", None, "csv", "sgd", 0.01, 0.0, 64, 100, True),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_tutorial_experiment_is_the_tutorials_exact_recipe(name):
    cfg = make_config(f"experiment={name}")
    model, batchnorm, data, opt, lr, momentum, batch, epochs, normalized = RECIPES[name]
    assert (cfg.model.name, cfg.model.kwargs.get("batchnorm"), cfg.data.name, cfg.optim.name) == \
        (model, batchnorm, data, opt)
    assert cfg.optim.lr == lr and cfg.optim.weight_decay == 0 and cfg.optim.l1 == 0 and cfg.sched.name == "none"
    if momentum is not None:
        assert cfg.optim.momentum == momentum and not cfg.optim.nesterov
    assert (cfg.data.batch_size, cfg.trainer.epochs, cfg.data.normalize) == (batch, epochs, normalized)
    assert cfg.data.augment == [] and not cfg.data.drop_last  # a DataLoader keeps the short last batch
    assert cfg.model.kwargs.get("dropout", 0) == 0 and cfg.trainer.label_smoothing == 0
    assert cfg.trainer.precision.value == "fp32"


def test_every_tutorial_in_the_recipe_table_has_its_experiment_file():
    assert set(RECIPES) <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_file_trains_a_few_steps_on_files_in_the_official_formats(tmp_path, quiet_logs, name,
                                                                                   data_root):
    root = () if name.startswith("char") else (f"data.root={data_root}",)  # char_*: the bundled text
    trainer = make_trainer(tmp_path, f"experiment={name}", *root, *offline(name), "data.batch_size=8",
                           "data.eval_batch_size=8",
                           "trainer.max_steps=2", "sched.warmup_steps=0", "logger=none")
    summary = trainer.fit()
    trainer.close()
    assert summary["steps"] == 2 and np.isfinite(summary["val_loss"])
    assert (tmp_path / "checkpoints" / "best.pt").exists()


def test_an_mnist_tutorial_runs_on_the_bundled_sample_with_its_own_recipe(tmp_path, quiet_logs):
    trainer = make_trainer(tmp_path, "experiment=mnist_mlp_tutorial", "data=mnist_sample", "trainer.epochs=1",
                           "logger=none")
    cfg = trainer.cfg
    assert cfg.data.name == "mnist_sample" and cfg.data.batch_size == 64 and not cfg.data.normalize
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum) == ("sgd", 0.01, 0.0)
    summary = trainer.fit()  # one epoch of the tutorial's SimpleNet and plain SGD on 9,000 images
    trainer.close()
    assert summary["steps"] == math.ceil(9000 / 64) and summary["val_acc"] > 0.5  # short last batch kept; chance is 0.1


def test_a_tutorial_whose_data_is_absent_names_the_files_and_where_to_put_them(tmp_path, quiet_logs):
    with pytest.raises(DataError) as err:  # dtrain's own bad-input error, which the CLI prints as one line
        make_trainer(tmp_path, "experiment=csv_linear_boston_tutorial", f"data.root={tmp_path}")
    assert str(err.value) == (f"data.path={str(tmp_path / 'boston_housing.csv')!r} does not exist: give a CSV file "
                              "whose first line names the columns")


# -- the tutorials' own classes ----------------------------------------------------------------------

PAIRS = {  # experiment -> the tutorial class it trains, and the class's constructor arguments
    "mnist_mlp_tutorial": (tutorials.SimpleNet, ()),
    "mnist_mlp3_tutorial": (tutorials.MnistNet, ()),
    "cifar10_lenet_tutorial": (tutorials.CifarNet, ()),
    "cifar10_convnet_tutorial": (tutorials.CNN, ()),
    "csv_linear_boston_tutorial": (tutorials.LinearModel, (13,)),
}
SMALL = ("data.batch_size=8", "data.eval_batch_size=8", "trainer.max_steps=2", "logger=none")


def offline(experiment: str) -> tuple[str, ...]:
    """The data set's own arguments that keep it offline (each data set takes its own: mnist, cifar10, csv;
    char_*: the bundled text)."""
    return {"mnist": ("data.download=false",), "cifar10": ("data.download=false", "data.verify_checksums=false"),
            "csv": (), "char": ()}[experiment.split("_")[0]]


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_what_dtrain_trains_loads_strictly_into_the_tutorials_class_and_computes_the_same(tmp_path, quiet_logs,
                                                                                          name, data_root):
    trainer = make_trainer(tmp_path, f"experiment={name}", f"data.root={data_root}", *SMALL, *offline(name))
    trainer.fit()
    trainer.close()
    api.export(tmp_path / "checkpoints" / "best.pt", "state_dict", tmp_path / "weights.pt")
    cls, args = PAIRS[name]
    theirs = cls(*args)
    theirs.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True), strict=True)
    x = torch.stack([trainer.splits.val[i][0] for i in range(4)])  # preprocessed as in training
    torch.testing.assert_close(theirs(x), trainer.model.eval()(x))


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_dtrain_starts_from_weights_the_tutorials_class_saved(tmp_path, quiet_logs, name, data_root):
    cls, args = PAIRS[name]
    torch.manual_seed(123)  # not dtrain's seed: weights dtrain would not draw itself
    theirs = cls(*args)
    torch.save(theirs.state_dict(), tmp_path / "tutorial.pt")
    trainer = make_trainer(tmp_path / "run", f"experiment={name}", f"data.root={data_root}", *SMALL, *offline(name),
                           f"model.init_from={tmp_path / 'tutorial.pt'}")
    mine = trainer.model.state_dict()
    assert mine.keys() == theirs.state_dict().keys()
    assert all(torch.equal(mine[k], v) for k, v in theirs.state_dict().items())
    x = torch.stack([trainer.splits.val[i][0] for i in range(4)])
    torch.testing.assert_close(trainer.model.eval()(x), theirs(x))
    trainer.close()


@pytest.mark.parametrize("old,model,shape", [(tutorials.old_mlp3, "mlp3", (1, 28, 28)),
                                             (tutorials.old_lenet, "lenet", (3, 32, 32)),
                                             (tutorials.old_convnet, "convnet", (3, 32, 32))])
def test_weights_saved_under_dtrains_earlier_layer_names_still_load(tmp_path, quiet_logs, old, model, shape):
    torch.manual_seed(5)
    net = old().eval()
    torch.save(net.state_dict(), tmp_path / "old.pt")
    data = ("data=mnist_sample",) if shape[0] == 1 else ("data=synthetic", "data.shape=[3,32,32]")
    trainer = make_trainer(tmp_path / "run", f"model={model}", *data,
                           f"model.init_from={tmp_path / 'old.pt'}", "logger=none")
    x = torch.randn(3, *shape)
    torch.testing.assert_close(trainer.model.eval()(x), net(x))
    trainer.close()


def test_init_from_weights_of_another_model_names_the_keys_that_do_not_fit(tmp_path, quiet_logs):
    torch.save(tutorials.CNN().state_dict(), tmp_path / "cnn.pt")
    fit = r"does not fit model=lenet \(missing fc3.bias, fc3.weight; other shapes: conv1.bias \[64\] vs \[6\]"
    with pytest.raises(ConfigError, match=fit):
        make_trainer(tmp_path / "run", "model=lenet", "data=synthetic", "data.shape=[3,32,32]",
                     f"model.init_from={tmp_path / 'cnn.pt'}")
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(ConfigError, match="is not a readable state_dict file"):
        make_trainer(tmp_path / "run", f"model.init_from={tmp_path / 'notes.txt'}")
    with pytest.raises(ConfigError, match="model.init_from=.*no such file"):
        make_config(f"model.init_from={tmp_path / 'missing.pt'}")
