"""Contracts a user's code and config must keep, each broken one refused in one line that names it."""

import datetime
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import dtrain
from conftest import make_trainer, run_cli
from dtrain import checkpoint as ckpt
from dtrain import models, perf, plugins
from dtrain.errors import ConfigError
from dtrain.runs import TrainingFailed


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.unit
def test_a_shard_class_that_names_no_submodule_is_refused_naming_the_classes_there_are():
    model = nn.Sequential(Block(), Block())
    assert len(models.blocks_of(model, ["Block"])) == 2
    with pytest.raises(ConfigError, match=r"dist.fsdp.shard=\['Blok'\]: Sequential has no submodule of class 'Blok'; "
                                          r"its classes are Block, Linear") as err:
        models.blocks_of(model, ["Blok"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="no submodule of class 'Blok'"):
        perf.checkpoint_activations(model, ["Blok"])  # activation checkpointing reads the same classes


@pytest.mark.unit
def test_a_record_holds_strict_json_with_null_for_nan_and_refuses_a_tensor_naming_its_key():

    import torch

    from dtrain.errors import ContractError
    from dtrain.rundir import as_json
    text = as_json({"val_loss": float("nan"), "best": float("inf"), "nested": {"x": [1.0, float("-inf")]}}, "summary")
    assert json.loads(text) == {"val_loss": None, "best": None, "nested": {"x": [1.0, None]}}
    assert "NaN" not in text and "Infinity" not in text
    with pytest.raises(ContractError, match=r"summary\['my_norm'\] is a Tensor, which JSON cannot hold; a callback "
                                            r"adding it must add numbers, strings, lists or dicts"):
        as_json({"steps": 3, "my_norm": torch.tensor(1.5)}, "summary")


# -- a user's objects given to dtrain.fit: each broken contract is one line and exit 2 -----------------------

def pairs(n: int = 64, classes: int = 2) -> TensorDataset:
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(0))
    return TensorDataset(x, torch.arange(n) % classes)


def fails(tmp_path, capsys, model, data, code=2, **given) -> str:
    """The one line a dtrain.fit that must fail printed (its exit code checked)."""
    overrides = ["trainer.epochs=1", "data.batch_size=16", "logger.plots=false", f"hydra.run.dir={tmp_path / 'run'}",
                 *given.pop("overrides", [])]
    with pytest.raises(TrainingFailed) as failed:
        dtrain.fit(model, data, overrides=overrides, **given)
    err = capsys.readouterr().err
    assert failed.value.code == code, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(x), x.mean()


class PilItems(Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        from PIL import Image
        return Image.new("RGB", (4, 4)), i % 2


class TenClasses(Dataset):
    num_classes = 2

    def __len__(self):
        return 64

    def __getitem__(self, i):
        return torch.randn(6), (i % 2) * 4  # labels 0 and 4, but 2 classes


@pytest.mark.parametrize("model,data,overrides,message", [
    (TwoHeads(), pairs(), [], "dtrain: error: model: TwoHeads.forward returned a tuple; dtrain's step needs one tensor "
                              "of outputs from it"),
    (nn.Linear(6, 3), pairs(), [], "model: Linear: the model's outputs have shape [16, 3] but the data has 2 "
                                   "classes: a classifier returns scores of shape [N, 2]"),
    (nn.Linear(6, 2), TenClasses(), [], "model: Linear: a class label is 4, outside 0..1 (the data has 2 classes)"),
    (nn.Linear(6, 2), TensorDataset(torch.randn(64, 6), torch.rand(64)), ["data.task=classification"],
     "data.task=classification but a target is tensor(0."),
    (nn.Linear(6, 2), PilItems(), [], "holds a PIL image; give the data set a transform that makes it a tensor"),
], ids=["tuple-output", "width", "label-range", "float-labels", "pil"])
def test_a_model_or_data_set_that_breaks_the_task_is_one_line_before_an_epoch(tmp_path, capsys, quiet_logs, model,
                                                                               data, overrides, message):
    assert message in fails(tmp_path, capsys, model, data, overrides=overrides)


@pytest.mark.parametrize("loss,message", [
    (lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"), "returned a tensor of shape [16]; a loss "
                                                                            "returns a scalar"),
    (lambda out, y: float(nn.functional.cross_entropy(out, y)), "returned a float; a loss returns a scalar tensor"),
    (lambda out, y: nn.functional.cross_entropy(out.detach(), y), "returned a tensor without a gradient"),
], ids=["not-scalar", "float", "no-grad"])
def test_a_loss_that_is_not_a_scalar_tensor_with_a_gradient_is_one_line(tmp_path, capsys, quiet_logs, loss, message):
    err = fails(tmp_path, capsys, nn.Linear(6, 2), pairs(), loss=loss)
    assert "dtrain: error: loss: <lambda> " in err and message in err, err


def test_a_metric_that_raises_is_named_on_the_first_batch_before_an_epoch(tmp_path, capsys, quiet_logs):
    calls = []

    def bad(out, y):
        calls.append(1)
        return 1 / 0

    err = fails(tmp_path, capsys, nn.Linear(6, 2), pairs(), metrics={"ratio": bad})
    assert "dtrain: error: metrics.ratio raised ZeroDivisionError: division by zero" in err
    assert calls == [1]  # on the first batch, not after an epoch of training


class Summarise:
    def on_fit_end(self, trainer, summary):
        summary["weight_norm"] = trainer.model.weight.norm()  # a tensor, not .item()


def test_a_callback_putting_a_tensor_into_the_summary_is_one_line_naming_the_key(tmp_path, capsys, quiet_logs):
    err = fails(tmp_path, capsys, nn.Linear(6, 2), pairs(), callbacks=[Summarise()])
    assert "summary['weight_norm'] is a Tensor, which JSON cannot hold" in err
    assert not (tmp_path / "run" / "summary.json").exists()


class Stateful:
    def __init__(self, value):
        self.value = value

    def state_dict(self):
        return {"kept": self.value}

    def load_state_dict(self, state):
        self.value = state["kept"]


@pytest.mark.parametrize("value,found", [
    (lambda: 1, "state_dict()['kept'] is a builtins.function"),
    (datetime.datetime(2026, 12, 5), "state_dict()['kept'] is a datetime.datetime"),
    (nn.Linear(1, 1), "state_dict()['kept'] is a torch.nn.modules.linear.Linear"),
    ([1, 2, {"f": open}], "state_dict()['kept'][2]['f'] is a builtins.builtin_function_or_method"),
], ids=["lambda", "datetime", "object", "nested"])
def test_callback_state_a_checkpoint_cannot_hold_is_refused_when_the_run_starts(tmp_path, capsys, quiet_logs, value,
                                                                                found):
    err = fails(tmp_path, capsys, nn.Linear(6, 2), pairs(), callbacks=[Stateful(value)])
    assert f"callbacks.Stateful: Stateful.{found}; a callback's state may hold only tensors" in err
    assert not list((tmp_path / "run").glob("checkpoints/*")) and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_callback_state_that_turns_unsaveable_later_stops_the_save_and_writes_nothing(tmp_path, quiet_logs):
    callback = Stateful(1)
    t = make_trainer(tmp_path, "data=synthetic", "data.num_samples=128", "data.shape=[1,4,4]", "data.batch_size=32",
                     "trainer.epochs=2", "logger=none")
    t.callbacks = t.callbacks.of({"mine": callback}, dict(t.callbacks.named))

    class Later:
        def on_train_epoch_end(self, trainer, metrics):
            callback.value = datetime.date(2026, 12, 5)

    t.callbacks = t.saved.states["callbacks"] = t.callbacks.of({"mine": callback, "later": Later()}, {})
    with pytest.raises(dtrain.errors.ContractError, match=r"callbacks.mine: Stateful.state_dict\(\)\['kept'\] is a "
                                                         r"datetime.date, which a checkpoint cannot hold"):
        t.fit()
    assert not list((tmp_path / "checkpoints").glob("step-*"))


def test_a_user_callback_named_like_one_of_dtrains_is_refused(tmp_path, quiet_logs):
    with pytest.raises(ConfigError, match=r"callbacks.early_stopping: the name is taken by dtrain's own EarlyStopping "
                                          r"callback; give yours another name"):
        make_trainer(tmp_path, "+callbacks.early_stopping._target_=dtrain.callbacks.Memory")


def test_nan_inputs_in_an_epoch_shorter_than_the_log_interval_stop_with_one_line_and_no_best(tmp_path, capsys,
                                                                                             quiet_logs):
    x = torch.randn(64, 6)
    x[::4] = math.nan  # in every batch
    err = fails(tmp_path, capsys, nn.Linear(6, 2), TensorDataset(x, torch.arange(64) % 2), code=1,
                overrides=["trainer.log_every_n_steps=50"])
    assert "dtrain: error: the mean training loss of the epoch is nan at epoch 1 step 3 (rank 0); lower optim.lr, " \
           "set trainer.grad_clip, or find the first bad batch with debug=anomaly" in err
    assert not (tmp_path / "run" / "checkpoints" / "best.pt").exists()


def test_a_nan_loss_on_a_log_step_is_one_line_and_exit_1(tmp_path, capsys, quiet_logs):
    x = torch.randn(64, 6)
    x[::4] = math.nan  # in every batch
    err = fails(tmp_path, capsys, nn.Linear(6, 2), TensorDataset(x, torch.arange(64) % 2), code=1,
                overrides=["trainer.log_every_n_steps=1"])
    assert "dtrain: error: the training loss is nan at epoch 1 step 1 (rank 0)" in err and "debug=anomaly" in err


@pytest.mark.unit
def test_a_nan_validation_metric_never_becomes_the_best(tmp_path):
    from dtrain.checkpointer import Checkpointer
    from dtrain.config import CheckpointConfig
    from dtrain.world import World
    saver = Checkpointer(tmp_path, CheckpointConfig(), World(), enabled=True, monitor="val_loss",
                         higher_is_better=False, meta={"config": {}}, record_change=print)
    saver.writer.write = lambda *args, **kwargs: None  # nothing written: only the choice of best is under test
    saver.save(None, 1, {"loss": math.nan})
    assert saver.best is None
    saver.save(None, 2, {"loss": 0.5})
    assert saver.best == 0.5


# -- checkpoints: never set aside because of what they hold, never a silent restart --------------------------

@pytest.mark.unit
def test_when_no_checkpoint_loads_the_run_does_not_silently_start_over(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "step-00000010.pt").write_bytes(b"half a file")
    with pytest.raises(dtrain.errors.CheckpointError, match=r"no checkpoint in .* can be loaded \(step-00000010.pt."
                                                            r"corrupt set aside as corrupt\); resume=none starts over"):
        ckpt.find_resumable(folder)
    with pytest.raises(dtrain.errors.CheckpointError, match="no checkpoint in"):  # and on the next attempt too
        ckpt.find_resumable(folder)
    assert ckpt.find_resumable(tmp_path / "nothing-yet") is None


class Payload:
    def __reduce__(self):
        return (print, ("ran",))


@pytest.mark.unit
def test_a_checkpoint_holding_code_is_refused_and_kept_where_it_is(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({"format": ckpt.FORMAT_VERSION, "x": Payload()}, folder / "step-00000010.pt")
    with pytest.raises(dtrain.errors.CheckpointError, match="was refused: it holds objects other than tensors"):
        ckpt.find_resumable(folder)
    assert (folder / "step-00000010.pt").exists() and not list(folder.glob("*.corrupt"))


# -- the run folder and plug-ins ----------------------------------------------------------------------------

@pytest.mark.unit
def test_a_missing_module_in_a_target_path_is_named_as_a_missing_module():
    with pytest.raises(ConfigError, match=r"model._target_=dtrain.doesnotexist.Net: no module named "
                                          r"'dtrain.doesnotexist'"):
        plugins.resolve("model", "dtrain.doesnotexist.Net")


def test_a_run_folder_that_is_a_dangling_symlink_is_one_line(tmp_path):
    (tmp_path / "run").symlink_to(tmp_path / "gone")
    run = run_cli(tmp_path / "run", "trainer.epochs=1")
    assert run.code == 2 and run.err.count("\n") == 1, run
    assert f"{tmp_path / 'run'} is a symbolic link to {tmp_path / 'gone'}, which does not exist" in run.err


def test_a_plugin_whose_constructor_raises_leaves_nothing_behind(tmp_path):
    (tmp_path / "mine.py").write_text("class Net:\n    def __init__(self, **kw):\n        raise ValueError('bad')\n")
    run = run_cli(tmp_path / "runs" / "r", "model._target_=mine.Net", "~model.dropout",
                  env={"PYTHONPATH": str(tmp_path)})
    assert run.code == 1 and "ValueError: bad" in run.err, run
    assert not (tmp_path / "runs").exists()


@pytest.mark.unit
def test_every_process_of_a_launch_takes_the_first_ones_view_of_what_existed_before_the_run_folder(tmp_path,
                                                                                                  monkeypatch):
    from dtrain import rundir
    monkeypatch.setenv("DTRAIN_RUN_ID", f"launch-{tmp_path.name}")
    run = tmp_path / "runs" / "a" / "b"
    first = rundir._existed_before_this_launch(run)  # rank 0, before its Hydra makes the folder
    run.mkdir(parents=True)  # rank 0's Hydra
    late = rundir._existed_before_this_launch(run)  # rank 1 looks only now: it must not think the folder was there
    assert first == late == tmp_path
    monkeypatch.setenv("DTRAIN_RUN_ID", f"another-launch-{tmp_path.name}")
    assert rundir._existed_before_this_launch(run) == run  # a later launch into the same folder: it existed
