"""Your model, data, loss, metrics and callbacks by `_target_`: what a config names is imported, checked and
built, and anything that cannot work is one line naming the key, what was found and what is expected."""

import subprocess
import sys

import pytest
import torch

from conftest import CHILD_ENV, make_config, make_trainer
from dtrain import callbacks, plugins
from dtrain.errors import ConfigError


@pytest.mark.unit
@pytest.mark.parametrize("overrides,message", [
    (["model._target_=nope.Net"], "model._target_=nope.Net: cannot import 'nope'"),
    (["model._target_=torch.nn.Nope"], "model._target_=torch.nn.Nope: torch.nn has no attribute 'Nope'"),
    (["+model.hiden=3"], "model: dtrain.models.mlp takes no argument 'hiden' (it takes input_shape, num_outputs, "
                         "dropout)"),
    (["model._target_=torch.nn.Linear", "~model.dropout"], "model: torch.nn.Linear needs in_features=...; give it "
                                                           "in the config"),
    (["data._target_=dtrain.data.nope"], "data._target_=dtrain.data.nope: dtrain.data has no attribute 'nope'"),
    (["data=synthetic", "+data.size=3"], "data: dtrain.data.synthetic takes no argument 'size'"),
    (["+loss._target_=torch.nn.CrossEntropyLoss", "+loss.smoothing=0.1"],
     "loss: torch.nn.CrossEntropyLoss takes no argument 'smoothing'"),
    (["+loss._target_=torch.nn.functional.cross_entropy", "+loss.label_smooth=0.1"],
     "loss: torch.nn.functional.cross_entropy takes no argument 'label_smooth'"),
    (["+metrics.top._target_=torch.nn.functional.nope"], "metrics.top._target_=torch.nn.functional.nope"),
    (["+callbacks.bad._target_=math.pi"], "callbacks.bad._target_=math.pi is a float, not a class or function"),
    (["+callbacks.bad=3"],
     "callbacks.bad: expected {_target_: package.module.Name, ...its keyword arguments}, found 3"),
])
def test_a_target_that_cannot_work_is_refused_at_validation_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        make_config(*overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.unit
def test_what_a_factory_returns_must_be_what_its_key_expects(tmp_path, quiet_logs):
    with pytest.raises(ConfigError, match="model: builtins.dict returned a dict, not a torch.nn.Module"):
        make_trainer(tmp_path, "model._target_=builtins.dict")
    with pytest.raises(ConfigError, match=r"data: builtins.object returned a object for 'train'; expected a torch "
                                          r"Dataset: map-style .* or an IterableDataset \(a stream\)"):
        make_trainer(tmp_path, "data._target_=builtins.object")
    from dtrain.config import DataConfig
    from dtrain.data import as_splits
    # an item that is not an (input, target) pair is the `free` task's: a model with its own training_step takes it
    assert as_splits(torch.utils.data.TensorDataset(torch.zeros(4, 2)), DataConfig(factory="my.inputs")).task == "free"


@pytest.mark.unit
def test_a_callback_with_a_misnamed_hook_or_half_its_state_is_refused():
    class Typo:
        def on_epoch_end(self, trainer):  # Lightning's old name: dtrain would never call it
            pass

    class HalfState:
        def state_dict(self):
            return {}

    with pytest.raises(ConfigError, match="callbacks.typo: Typo.on_epoch_end is not a dtrain hook; the hooks are "
                                          "on_fit_start, on_train_epoch_start"):
        callbacks.Callbacks({"typo": Typo()})
    with pytest.raises(ConfigError, match="callbacks.half: HalfState has only one of state_dict and load_state_dict"):
        callbacks.Callbacks({"half": HalfState()})


@pytest.mark.unit
def test_dtrain_offers_a_model_the_datas_shape_and_classes_by_name_and_the_config_gives_the_rest(tmp_path,
                                                                                                quiet_logs):
    trainer = make_trainer(tmp_path, "model._target_=torch.nn.Linear", "~model.dropout", "data=synthetic",
                           "data.shape=[6]", "data.num_classes=3", "+model.in_features=6", "+model.out_features=3",
                           "logger=none")
    assert isinstance(trainer.model, torch.nn.Linear) and trainer.model.weight.shape == (3, 6)
    assert plugins.accepted(lambda input_shape, hidden=2: None, {"input_shape": (6,), "num_outputs": 3}) == \
        {"input_shape": (6,)}


def test_a_loss_function_and_a_loss_module_both_train_and_the_loss_is_reported_with_it(tmp_path, quiet_logs):
    by_function = make_trainer(tmp_path / "f", "+loss._target_=torch.nn.functional.cross_entropy",
                               "+loss.label_smoothing=0.5", "trainer.max_steps=3", "logger=none")
    by_module = make_trainer(tmp_path / "m", "+loss._target_=torch.nn.CrossEntropyLoss",
                             "+loss.label_smoothing=0.5", "trainer.max_steps=3", "logger=none")
    plain = make_trainer(tmp_path / "p", "trainer.max_steps=3", "logger=none")
    out, y = torch.tensor([[4.0, 0.0]]), torch.tensor([0])
    assert by_function.loss(out, y) == pytest.approx(by_module.loss(out, y).item())
    assert by_function.loss(out, y) > plain.loss(out, y)  # smoothing raises a confident prediction's loss
    for t in (by_function, by_module):
        summary = t.fit()
        t.close()
        assert summary["steps"] == 3


@pytest.mark.parametrize("entry", [["-m", "dtrain"], ["-m", "dtrain.launch", "launcher.nproc_per_node=2"]])
def test_a_bad_target_on_the_command_line_is_one_line_exit_2_and_no_run_folder(tmp_path, entry):
    proc = subprocess.run([sys.executable, *entry, "model._target_=mypkg.Net"], cwd=tmp_path, env=CHILD_ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("dtrain: error: model._target_=mypkg.Net: cannot import 'mypkg' (No module named "
                                   "'mypkg'); install the package that defines it, or put its folder on PYTHONPATH")
    assert list(tmp_path.iterdir()) == [] and "dtrain.launch:" not in proc.stdout  # no worker started


@pytest.mark.unit
def test_named_entries_can_be_removed_by_name_and_a_list_is_named_by_its_targets():
    cfg = make_config("+callbacks.a._target_=builtins.object", "+callbacks.b._target_=builtins.object",
                      "~callbacks.a")
    assert list(cfg.callbacks) == ["b"] and cfg.callbacks["b"] == plugins.Target("builtins.object", {})
    from dtrain.validate import named_targets
    assert list(named_targets("metrics", [{"_target_": "torchmetrics.Accuracy", "task": "binary"}])) == ["accuracy"]


def test_a_checkpoint_of_a_model_whose_package_is_gone_says_so_in_one_line(tmp_path, quiet_logs):
    from dtrain import api
    from dtrain.errors import CheckpointError
    trainer = make_trainer(tmp_path, "trainer.max_steps=2", "logger=none")
    trainer.fit()
    trainer.close()
    state = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    state["config"]["model"]["_target_"] = "gone.models.Net"  # as on a machine without the user's package
    torch.save(state, tmp_path / "moved.pt")
    with pytest.raises(CheckpointError) as err:
        api.load_model(tmp_path / "moved.pt")
    assert str(err.value) == (f"checkpoint {tmp_path / 'moved.pt'}: its model cannot be rebuilt: model._target_="
                              "gone.models.Net: cannot import 'gone' (No module named 'gone'); install the package "
                              "that defines it, or put its folder on PYTHONPATH")
    proc = subprocess.run([sys.executable, "-m", "dtrain.predict", f"ckpt={tmp_path / 'moved.pt'}",
                           f"input={tmp_path / 'x.npy'}"], env=CHILD_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "cannot import 'gone'" in proc.stderr
