"""data=csv: a table trains regression or classification, its features standardised with the training
split's statistics, which the checkpoint keeps for evaluation, prediction and export; a bad file is one
clear line."""

import json

import numpy as np
import pytest
import torch

from conftest import make_config, make_trainer, run_cli
from dtrain import api, data
from dtrain import world as w
from dtrain.errors import BadInput, DataError

CSV = ("data=csv", "model=linear", "logger=none")


def write_table(path, rows: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """y = 3 a - 2 b + 0.5 c + 10 with features of very different scales, and a label column."""
    rng = np.random.default_rng(seed)
    x = np.stack([rng.normal(100, 20, rows), rng.normal(0, 0.01, rows), rng.normal(5, 1, rows)], 1)
    y = 3 * (x[:, 0] - 100) / 20 - 2 * x[:, 1] / 0.01 + 0.5 * (x[:, 2] - 5) + 10
    label = np.where(x[:, 0] > 100, "high", "low")
    lines = ["a,b,c,y,label"] + [f"{a:.6f},{b:.8f},{c:.6f},{t:.6f},{lab}" for (a, b, c), t, lab in zip(x, y, label)]
    path.write_text("\n".join(lines) + "\n")
    return x, y


@pytest.mark.unit
def test_a_csv_regression_standardises_features_with_the_training_split_statistics(tmp_path):
    x, _ = write_table(tmp_path / "t.csv")
    cfg = make_config(*CSV, f"data.path={tmp_path / 't.csv'}", "data.target=y", "data.features=[a,b,c]")
    splits = data.build(cfg.data, w.World())
    mean, std = map(torch.tensor, splits.scaler)
    train_rows = torch.from_numpy(x).float()[data.split_indices(200, cfg.data)[0][20:]]  # train = after the test rows
    torch.testing.assert_close(mean, train_rows.mean(0))
    torch.testing.assert_close(std, train_rows.std(0, unbiased=False))  # StandardScaler's population std
    assert splits.train.x.mean(0).abs().max() < 1e-5 and (splits.train.x.std(0, unbiased=False) - 1).abs().max() < 1e-4
    assert (len(splits.train), len(splits.val), len(splits.test)) == (160, 20, 20)
    assert splits.describe()["features"] == ["a", "b", "c"] and splits.describe()["target"] == "y"


def test_a_csv_regression_learns_the_table_and_its_model_predicts_from_raw_rows(tmp_path, quiet_logs):
    x, y = write_table(tmp_path / "t.csv")
    trainer = make_trainer(tmp_path / "run", *CSV, f"data.path={tmp_path / 't.csv'}", "data.target=y",
                           "data.features=[a,b,c]", "optim=sgd", "optim.lr=0.05", "optim.weight_decay=0",
                           "data.batch_size=16", "trainer.epochs=30")
    summary = trainer.fit()
    trainer.close()
    assert summary["val_loss"] < 1e-3 and summary["test_loss"] < 1e-3
    model = api.load_model(tmp_path / "run" / "checkpoints" / "best.pt")
    predicted = model.predict(torch.from_numpy(x[:5]).float()).squeeze(1)
    np.testing.assert_allclose(predicted.numpy(), y[:5], atol=0.05)
    (tmp_path / "new.csv").write_text("c,a,b\n" + "\n".join(f"{c},{a},{b}" for a, b, c in x[:3]) + "\n")
    rows = api.predict(tmp_path / "run" / "checkpoints" / "best.pt", tmp_path / "new.csv")
    np.testing.assert_allclose([r["prediction"][0] for r in rows], y[:3], atol=0.05)  # columns by name


def test_a_csv_classification_takes_word_labels_and_reports_f1_and_auc(tmp_path, quiet_logs):
    write_table(tmp_path / "t.csv")
    trainer = make_trainer(tmp_path / "run", "data=csv", "model=mlp", f"data.path={tmp_path / 't.csv'}",
                           "data.target=label", "data.features=[a,c]", "data.task=classification",
                           "trainer.epochs=20", "logger=none")
    summary = trainer.fit()
    trainer.close()
    assert trainer.splits.class_names == ["high", "low"]
    assert summary["val_acc"] >= 0.9 and summary["val_f1"] >= 0.9 and summary["val_auc"] >= 0.95
    result = api.evaluate(tmp_path / "run" / "checkpoints" / "best.pt")
    assert result["classes"] == ["high", "low"] and result["split"] == "test"


@pytest.mark.unit
def test_evaluating_another_file_uses_the_training_statistics_stored_in_the_checkpoint(tmp_path, quiet_logs):
    write_table(tmp_path / "t.csv")
    trainer = make_trainer(tmp_path / "run", *CSV, f"data.path={tmp_path / 't.csv'}", "data.target=y",
                           "data.features=[a,b,c]", "trainer.epochs=1")
    trainer.fit()
    trainer.close()
    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"
    assert torch.load(ckpt, weights_only=True)["data"]["mean"] == trainer.splits.scaler[0]
    write_table(tmp_path / "other.csv", seed=1)
    evaluated = api.evaluate(ckpt, "test", data={"path": str(tmp_path / "other.csv")})
    other = data.build(make_config(*CSV, f"data.path={tmp_path / 'other.csv'}", "data.target=y",
                                   "data.features=[a,b,c]", f"data.mean={trainer.splits.scaler[0]}",
                                   f"data.std={trainer.splits.scaler[1]}").data, w.World())
    model = api.load_model(ckpt).net
    expected = torch.nn.functional.mse_loss(model(other.test.x), other.test.y).item()
    assert evaluated["loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.unit
@pytest.mark.parametrize("content,match", [
    ("", "is empty"),
    ("a,b,y\n", "has a header but no rows"),
    ("1.0,2.0,3.0\n4,5,6\n", "has no header row"),
    ("a,b,y\n1,2,3\n4,,6\n7,8,9\n", r"data row 2, column 'b' is empty"),
    ("a,b,y\n1,2,3\n4,five,6\n7,8,9\n", r"data row 2, column 'b' holds 'five', not a finite number"),
    ("a,b,y\n1,2,3\n4,5\n", "data row 2 has 2 cells but the header names 3 columns"),
    ("a,b,z\n1,2,3\n4,5,6\n7,8,9\n", r"has no column 'y' \(data.target, data.features\); its columns are a, b, z"),
    ("a;b;y\n1;2;3\n4;5;nan\n7;8;9\n", r"data row 2, column 'y' holds 'nan'"),
])
def test_a_bad_table_is_one_data_error_naming_the_file_and_what_is_wrong(tmp_path, content, match):
    (tmp_path / "t.csv").write_text(content)
    cfg = make_config(*CSV, f"data.path={tmp_path / 't.csv'}", "data.target=y")
    with pytest.raises(DataError, match=match):
        data.build(cfg.data, w.World())


def test_the_cli_refuses_a_missing_file_or_column_in_one_line_with_exit_2_and_no_run_folder(tmp_path):
    run = run_cli(tmp_path / "run", *CSV, f"data.path={tmp_path / 'absent.csv'}", "data.target=y")
    assert run.code == 2, run
    assert run.err.strip().splitlines() == [f"dtrain: error: data.path='{tmp_path / 'absent.csv'}' does not exist: "
                                            "give a CSV file whose first line names the columns"]
    assert not (tmp_path / "run").exists()
    missing = run_cli(tmp_path / "run", *CSV, f"data.path={tmp_path / 'absent.csv'}", "data.target=")
    assert missing.code == 2 and "data=csv needs the name of the column to predict" in missing.err, missing


@pytest.mark.unit
def test_data_task_is_only_for_tables():
    with pytest.raises(BadInput, match="data=mnist_sample decides its own task"):
        make_config("data.task=regression")


@pytest.mark.unit
def test_a_prediction_csv_without_the_training_columns_is_refused(tmp_path, quiet_logs):
    write_table(tmp_path / "t.csv")
    trainer = make_trainer(tmp_path / "run", *CSV, f"data.path={tmp_path / 't.csv'}", "data.target=y",
                           "data.features=[a,b,c]", "trainer.max_steps=1", "trainer.epochs=1")
    trainer.fit()
    trainer.close()
    (tmp_path / "few.csv").write_text("a,b\n1,2\n")
    with pytest.raises(BadInput, match=r"has no column 'c'; the model takes a, b, c"):
        api.predict(tmp_path / "run" / "checkpoints" / "best.pt", tmp_path / "few.csv")
    info = json.loads(json.dumps(api.load_model(tmp_path / "run" / "checkpoints" / "best.pt").info))
    assert info["features"] == ["a", "b", "c"] and len(info["mean"]) == 3


@pytest.mark.unit
def test_a_table_that_moved_resumes_from_its_new_place(tmp_path, quiet_logs):
    write_table(tmp_path / "t.csv")
    common = (*CSV, "data.target=y", "data.features=[a,b,c]")
    first = make_trainer(tmp_path / "run", *common, f"data.path={tmp_path / 't.csv'}", "trainer.epochs=1")
    first.fit()
    first.close()
    (tmp_path / "t.csv").rename(tmp_path / "moved.csv")
    resumed = make_trainer(tmp_path / "run", *common, f"data.path={tmp_path / 'moved.csv'}", "trainer.epochs=1")
    assert resumed.fit()["steps"] == first.progress.step  # finished already: continued, not refused
    resumed.close()


@pytest.mark.unit
def test_numeric_class_labels_keep_their_numeric_order(tmp_path):
    rows = [f"{i % 7},{label}" for i, label in enumerate(["10", "2", "1"] * 4)]
    (tmp_path / "t.csv").write_text("x,grade\n" + "\n".join(rows) + "\n")
    cfg = make_config("data=csv", f"data.path={tmp_path / 't.csv'}", "data.target=grade", "data.task=classification")
    splits = data.build(cfg.data, w.World())
    assert splits.class_names == ["1", "2", "10"] and splits.out == 3
