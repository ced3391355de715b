"""Using a trained model: evaluate (per class, under torchrun), predict on real files, export checked in
onnxruntime, and the Python API the command-line entries stand on."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CHILD_ENV, ROOT, make_trainer, run_cli
from dtrain import api, models
from dtrain.errors import BadInput, ConfigError

WORKLOADS = {  # model -> the data it trains on here
    "mlp": ("data=mnist_sample",), "mlp3": ("data=mnist_sample",), "lenet": ("data=mnist_sample",),
    "convnet": ("data=mnist_sample",), "linear": ("data=regression",),
    "resnet18": ("data=synthetic", "data.shape=[3,32,32]", "data.num_samples=64", "data.batch_size=16"),
}


def trained(folder, model: str, *extra: str) -> str:
    """A checkpoint of `model` after a few steps (the weights need not be good, only real)."""
    trainer = make_trainer(folder, f"model={model}", *WORKLOADS[model], "trainer.max_steps=3", "trainer.epochs=1",
                           "logger=none", *extra)
    trainer.fit()
    trainer.close()
    return str(folder / "checkpoints" / "best.pt")


@pytest.fixture(scope="module")
def mnist_ckpt(tmp_path_factory):
    from dtrain import logs
    try:
        return trained(tmp_path_factory.mktemp("mlp"), "mlp", "trainer.max_steps=140")
    finally:
        logs.close_console()


def sample_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` validation images of the bundled sample (uint8) and their labels."""
    cfg = api.make_config()
    from dtrain import data, world as w
    val = data.build(cfg.data, w.World()).val
    return val.x[:n], val.y[:n]


# -- export ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", list(WORKLOADS))
def test_every_workload_exports_to_onnx_with_a_dynamic_batch_matching_pytorch_in_onnxruntime(tmp_path, model,
                                                                                             quiet_logs):
    import onnxruntime
    path = trained(tmp_path, model)
    result = api.export(path, "onnx", tmp_path / "model.onnx")
    assert result["max_abs_diff"] <= 1e-3
    loaded = api.load_model(path)
    x = loaded.preprocess(torch.rand(5, *loaded.info["shape"]))  # a batch size never exported
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, loaded.net(x).detach().numpy(), atol=1e-4, rtol=1e-4)


def test_the_state_dict_export_loads_strictly_into_the_plain_model_class_and_torchscript_runs_alone(
        tmp_path, mnist_ckpt):
    loaded = api.load_model(mnist_ckpt)
    api.export(mnist_ckpt, "state_dict", tmp_path / "weights.pt")
    api.export(mnist_ckpt, "torchscript", tmp_path / "model.ts")
    plain = models.build(models.builtin("mlp"), "classification", (1, 28, 28), 10, "mnist_sample")
    plain.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True), strict=True)
    x = loaded.preprocess(sample_images(4)[0])
    torch.testing.assert_close(plain(x), loaded.net(x))
    torch.testing.assert_close(torch.jit.load(str(tmp_path / "model.ts"))(x), loaded.net(x))
    meta = (tmp_path / "weights.pt.json").read_text()
    assert '"mean"' in meta and '"shape"' in meta


def test_export_refuses_an_unknown_format_an_existing_file_and_a_file_that_is_no_checkpoint(tmp_path, mnist_ckpt):
    with pytest.raises(ConfigError, match="format='tflite' is not allowed: choose one of onnx, torchscript"):
        api.export(mnist_ckpt, "tflite", tmp_path / "m")
    (tmp_path / "taken.onnx").write_text("mine")
    with pytest.raises(BadInput, match="taken.onnx exists; choose another out= or set overwrite=true"):
        api.export(mnist_ckpt, "onnx", tmp_path / "taken.onnx")
    assert (tmp_path / "taken.onnx").read_text() == "mine"
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    proc = subprocess.run([sys.executable, "-m", "dtrain.export", f"ckpt={tmp_path / 'notes.pt'}", "format=onnx",
                           f"out={tmp_path / 'x.onnx'}"], env=CHILD_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not a checkpoint" in proc.stderr


def test_an_onnx_export_is_one_file_and_writes_over_no_file_of_the_users(tmp_path, mnist_ckpt):
    (tmp_path / "y.onnx.data").write_text("data")  # the user's, named like an external-weights file
    (tmp_path / "y.onnx.json").write_text("mine")
    with pytest.raises(BadInput, match="y.onnx.json exists"):  # checked before anything is written
        api.export(mnist_ckpt, "onnx", tmp_path / "y.onnx")
    assert not (tmp_path / "y.onnx").exists() and (tmp_path / "y.onnx.json").read_text() == "mine"
    (tmp_path / "y.onnx.json").unlink()
    proc = subprocess.run([sys.executable, "-m", "dtrain.export", f"ckpt={mnist_ckpt}", "format=onnx",
                           f"out={tmp_path / 'y.onnx'}"], env=CHILD_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "y.onnx.data").read_text() == "data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["y.onnx", "y.onnx.data", "y.onnx.json"]
    import onnx  # the weights are inside the one file: it loads with nothing beside it
    moved = tmp_path / "alone"
    moved.mkdir()
    (tmp_path / "y.onnx").rename(moved / "y.onnx")
    onnx.checker.check_model(onnx.load(str(moved / "y.onnx")), full_check=True)
    assert ".data" not in proc.stdout


def test_an_onnx_export_too_large_for_one_file_checks_and_names_its_weights_file(tmp_path, mnist_ckpt, monkeypatch):
    from dtrain import exporting as export
    monkeypatch.setattr(export, "ONNX_SINGLE_FILE_BYTES", 1000)  # as if the model were over 2 GB
    (tmp_path / "big.onnx.data").write_text("data")
    with pytest.raises(BadInput, match="big.onnx.data exists"):
        api.export(mnist_ckpt, "onnx", tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").read_text() == "data" and not (tmp_path / "big.onnx").exists()
    result = api.export(mnist_ckpt, "onnx", tmp_path / "ok.onnx")
    assert str(tmp_path / "ok.onnx.data") in result["files"] and (tmp_path / "ok.onnx.data").stat().st_size > 1000


# -- predict ---------------------------------------------------------------------------------------

def test_predict_reads_image_files_a_folder_and_tensor_files_with_the_training_preprocessing(tmp_path, mnist_ckpt):
    images, labels = sample_images(6)
    folder = tmp_path / "digits"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image[0].numpy()).save(folder / f"{i}.png")
    model = api.load_model(mnist_ckpt)
    expected = model.predict(images).argmax(1)  # the same pixels straight from the data set
    rows = api.predict(mnist_ckpt, folder, topk=3)
    assert [r["input"] for r in rows] == [str(folder / f"{i}.png") for i in range(6)]
    assert [int(r["top"][0][0]) for r in rows] == expected.tolist()
    assert all(len(r["top"]) == 3 and r["top"][0][1] >= r["top"][1][1] for r in rows)
    np.save(tmp_path / "batch.npy", images.numpy())
    torch.save(images[0], tmp_path / "one.pt")
    assert [int(r["top"][0][0]) for r in api.predict(mnist_ckpt, tmp_path / "batch.npy")] == expected.tolist()
    assert [int(r["top"][0][0]) for r in api.predict(mnist_ckpt, tmp_path / "one.pt")] == expected[:1].tolist()
    proc = subprocess.run([sys.executable, "-m", "dtrain.predict", f"ckpt={mnist_ckpt}", f"input={folder}", "topk=2"],
                          cwd=tmp_path, env=CHILD_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    written = list(csv.reader(open(tmp_path / "predictions.csv")))
    assert written[0] == ["input", "class1", "prob1", "class2", "prob2"] and len(written) == 7
    assert [int(r[1]) for r in written[1:]] == expected.tolist()
    assert f"{folder / '0.png'}: {expected[0].item()} " in proc.stdout


def test_predict_for_an_image_folder_model_decodes_and_resizes_as_its_training_did(tmp_path, quiet_logs):
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / "images" / "train" / label).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, (30, 45, 3), dtype=np.uint8)  # resized to 32x32 on both sides
            Image.fromarray(pixels).save(tmp_path / "images" / "train" / label / f"{i}.png")
    trainer = make_trainer(tmp_path / "run", "data=imagefolder", f"data.root={tmp_path / 'images'}", "model=lenet",
                           "data.batch_size=4", "data.eval_batch_size=4", "trainer.max_steps=2", "logger=none")
    trainer.fit()
    trainer.close()
    image = tmp_path / "images" / "train" / "dog" / "5.png"
    seen_in_training = trainer.splits.train.dataset.transform(trainer.splits.train.dataset.loader(str(image)))
    model = api.load_model(tmp_path / "run" / "checkpoints" / "best.pt")
    [row] = api.predict(tmp_path / "run" / "checkpoints" / "best.pt", image, topk=2)
    with torch.no_grad():
        expected = model.net(seen_in_training[None]).softmax(1)[0]
    assert dict(row["top"]) == pytest.approx({"cat": expected[0].item(), "dog": expected[1].item()}, abs=1e-5)


@pytest.mark.parametrize("make,message", [
    (lambda p: Image.new("RGB", (28, 28)).save(p / "x.png"), "has 3 channel(s) (RGB) but the model takes 1"),
    (lambda p: Image.new("L", (32, 32)).save(p / "x.png"), "is 32x32 pixels but the model takes 28x28; resize it"),
    (lambda p: np.save(p / "x.npy", np.zeros((2, 3, 28, 28), np.uint8)),
     "shape [2, 3, 28, 28] but the model takes [1, 28, 28]"),
    (lambda p: (p / "x.png").write_text("not an image"), "is not a readable image"),
])
def test_predict_names_an_input_of_the_wrong_size_channels_or_kind(tmp_path, mnist_ckpt, make, message):
    make(tmp_path)
    [path] = tmp_path.iterdir()
    proc = subprocess.run([sys.executable, "-m", "dtrain.predict", f"ckpt={mnist_ckpt}", f"input={path}"],
                          cwd=tmp_path, env=CHILD_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_predict_checks_where_its_csv_goes_before_predicting(tmp_path, mnist_ckpt):
    np.save(tmp_path / "x.npy", sample_images(2)[0].numpy())
    proc = subprocess.run([sys.executable, "-m", "dtrain.predict", f"ckpt={mnist_ckpt}", f"input={tmp_path / 'x.npy'}",
                           f"out={tmp_path / 'nodir' / 'x.csv'}"], env=CHILD_ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "the folder" in proc.stderr and "nodir does not exist" in proc.stderr and proc.stdout == ""


def test_predict_refuses_float_images_outside_0_to_1(tmp_path, mnist_ckpt):
    images = sample_images(2)[0].float()  # 0..255 as floats: the classic slip
    with pytest.raises(BadInput,
                       match="float image inputs must be pixels scaled to 0..1, but these range from 0 to 255"):
        api.load_model(mnist_ckpt).predict(images)
    torch.testing.assert_close(api.load_model(mnist_ckpt).predict(images / 255),
                               api.load_model(mnist_ckpt).predict(images.to(torch.uint8)))


def test_a_checkpoint_without_its_stored_preprocessing_gets_it_from_its_data_config(tmp_path, mnist_ckpt):
    state = torch.load(mnist_ckpt, weights_only=True)
    del state["data"]  # as checkpoints written before dtrain stored it
    torch.save(state, tmp_path / "old.pt")
    assert api.load_model(tmp_path / "old.pt").info == api.load_model(mnist_ckpt).info


# -- evaluate --------------------------------------------------------------------------------------

def test_evaluate_reports_per_class_accuracy_and_the_confusion_matrix_the_same_on_two_ranks(tmp_path, mnist_ckpt):
    one = api.evaluate(mnist_ckpt, "val")
    matrix = np.array(one["confusion"])
    assert matrix.sum() == one["samples"] == 1000 and np.trace(matrix) / 1000 == pytest.approx(one["acc"])
    assert one["per_class_acc"] == pytest.approx(list(np.diag(matrix) / matrix.sum(1)))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "dtrain.evaluate", f"ckpt={mnist_ckpt}", "split=val"], cwd=tmp_path,
                          env=CHILD_ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    two = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(two) == 1  # printed once, by rank 0
    import json
    assert json.loads(two[0])["confusion"] == one["confusion"]


# -- the Python API --------------------------------------------------------------------------------

def test_the_python_api_trains_with_overrides_and_reads_back_what_the_run_wrote(tmp_path, quiet_logs):
    summary = api.train("trainer.epochs=1", "logger.plots=false", f"hydra.run.dir={tmp_path / 'run'}")
    assert summary["epochs"] == 1 and summary == api.read_summary(tmp_path / "run")
    assert [m["epoch"] for m in api.read_metrics(tmp_path / "run")] == [1]
    model = api.load_model(tmp_path / "run" / "checkpoints" / "best.pt")
    images, labels = sample_images(1000)
    assert (model.predict(images).argmax(1) == labels).float().mean().item() == pytest.approx(summary["val_acc"])
    assert isinstance(api.build_model("lenet"), torch.nn.Module)
    with pytest.raises(api.TrainingFailed) as failed:
        api.train("optim.lr=-1", f"hydra.run.dir={tmp_path / 'bad'}")
    assert failed.value.code == 2
    with pytest.raises(BadInput, match="no metrics.jsonl"):
        api.read_metrics(tmp_path)


@pytest.mark.slow  # in CI's slow tier: the default tier stays under 10 minutes
def test_the_readme_walk_train_evaluate_predict_export(tmp_path):
    run = run_cli(tmp_path / "run", "trainer.epochs=1")
    assert run.code == 0, run
    image = tmp_path / "digit.png"
    Image.fromarray(sample_images(1)[0][0, 0].numpy()).save(image)
    best = str(run.dir / "checkpoints" / "best.pt")
    for cmd in (["-m", "dtrain.evaluate", f"ckpt={best}"], ["-m", "dtrain.predict", f"ckpt={best}", f"input={image}"],
                ["-m", "dtrain.export", f"ckpt={best}", "format=onnx", f"out={tmp_path / 'model.onnx'}"]):
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True,
                              timeout=180)
        assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "model.onnx").stat().st_size > 0
