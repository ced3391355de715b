"""A user's own project (examples/seqcls): their GRU, Dataset class, focal loss, torchmetrics metric,
callback with state and config folder, trained by a non-editable dtrain from another folder, through the
config route (`--config-dir`) and the Python route (`dtrain.fit`)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import CHILD_ENV, FAULTS, ROOT, assert_same_weights

EXAMPLE = ROOT / "examples" / "seqcls"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """dtrain and the example package installed (not editable) into a prefix; the project's own folder (its
    configs and train.py) copied elsewhere; and a third folder to run from."""
    base = tmp_path_factory.mktemp("user")
    src, prefix = base / "dtrain-src", base / "prefix"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "tests", "examples",
                                                              "*.egg-info", "__pycache__", "build"))
    project = shutil.copytree(EXAMPLE, base / "project", ignore=shutil.ignore_patterns("__pycache__", "build"))
    for package in (src, project):
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--target", str(prefix), str(package)], capture_output=True, text=True, timeout=300)
        assert pip.returncode == 0, pip.stderr[-3000:]
    shutil.rmtree(src)
    shutil.rmtree(project / "seqcls")  # the project's code now runs from the installed package only
    (base / "elsewhere").mkdir()
    return SimpleNamespace(env={**CHILD_ENV, "PYTHONPATH": str(prefix)}, project=project, cwd=base / "elsewhere",
                           conf=str(project / "conf"))


def run(installed, *cmd: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), cwd=installed.cwd, env={**installed.env, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


def final(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip(),
                      weights_only=True)


@pytest.mark.slow
def test_the_config_route_stops_mid_epoch_resumes_and_ends_bit_identical_with_its_callback_state(installed, tmp_path):
    common = ("--config-dir", installed.conf, "experiment=seqcls", "trainer.epochs=3")
    reference = run(installed, *TORCHRUN, "-m", "dtrain", *common, f"hydra.run.dir={tmp_path / 'ref'}")
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert "dtrain/" not in reference.stderr and str(ROOT) not in reference.stdout  # the installed dtrain ran
    # SIGTERM on rank 1 after step 40: 12 steps into epoch 2 (28 steps an epoch), where the ranks agree to stop.
    stopped = run(installed, *TORCHRUN, FAULTS, *common, f"hydra.run.dir={tmp_path / 'run'}",
                  env={"DTRAIN_FAULT": "term:1:40"})
    assert "stopped by SIGTERM after step 40: checkpoint saved" in stopped.stdout, stopped.stderr[-3000:]
    resumed = run(installed, *TORCHRUN, "-m", "dtrain", *common, f"hydra.run.dir={tmp_path / 'run'}")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]

    ref, res = final(tmp_path / "ref"), final(tmp_path / "run")
    assert_same_weights(ref["model"], res["model"], rtol=0, atol=0)
    history = ref["callbacks"]["history"]["history"]
    assert len(history) == 3 and res["callbacks"]["history"] == ref["callbacks"]["history"]  # survived the resume
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs_seen_by_callback"] == 3 and summary["model"] == "GRUClassifier"
    assert summary["val_macro_f1_tm"] == pytest.approx(summary["val_f1"], abs=1e-6)  # torchmetrics agrees
    assert json.loads((tmp_path / "run" / "val_loss_history.json").read_text()) == history

    # The checkpoint records the model's _target_ and arguments: the user's GRU is rebuilt and exported.
    onnx = run(installed, sys.executable, "-m", "dtrain.export", f"ckpt={tmp_path / 'run' / 'checkpoints' / 'best.pt'}",
               "format=onnx", f"out={tmp_path / 'seq.onnx'}")
    assert onnx.returncode == 0 and "onnxruntime output within" in onnx.stdout, onnx.stderr[-3000:]
    assert res["config"]["model"]["_target_"] == "seqcls.model.GRUClassifier" and res["config"]["model"]["hidden"] == 32


@pytest.mark.slow
def test_the_python_route_trains_the_same_with_one_process_and_under_torchrun(installed, tmp_path):
    script = str(installed.project / "train.py")
    one = run(installed, sys.executable, script, "trainer.epochs=2", f"hydra.run.dir={tmp_path / 'one'}")
    two = run(installed, *TORCHRUN, script, "trainer.epochs=2", f"hydra.run.dir={tmp_path / 'two'}")
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two")]
    assert [s["world_size"] for s in summaries] == [1, 2]
    assert [s["epochs_seen_by_callback"] for s in summaries] == [2, 2]
    assert_same_weights(final(tmp_path / "one")["model"], final(tmp_path / "two")["model"], rtol=1e-4, atol=1e-5)
    fitted = final(tmp_path / "two")
    assert fitted["config"]["model"]["_target_"] == "seqcls.model.GRUClassifier"  # rebuildable from the checkpoint
    predict = run(installed, sys.executable, "-c", "import dtrain, torch; m = dtrain.load_model("
                  f"'{tmp_path / 'two' / 'checkpoints' / 'best.pt'}'); print(m.predict(torch.zeros(3, 24, 4)).shape)")
    assert predict.returncode == 0 and "torch.Size([3, 4])" in predict.stdout, predict.stderr[-3000:]


def test_fit_trains_a_users_objects_in_this_process_with_their_loss_metrics_and_callback(tmp_path, quiet_logs,
                                                                                        monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import dtrain
    from seqcls.callbacks import LossHistory
    from seqcls.data import Sequences
    from seqcls.losses import FocalLoss
    from seqcls.model import GRUClassifier
    calls = []

    class Spy:
        def on_log_step(self, trainer, metrics):
            calls.append(metrics["step"])

    history = LossHistory()
    summary = dtrain.fit(GRUClassifier, Sequences(size=256), loss=FocalLoss(),
                         metrics={"wrong": lambda out, y: (out.argmax(1) != y).float().mean()},
                         callbacks=[history, Spy()],
                         overrides=["trainer.epochs=2", "trainer.log_every_n_steps=2", "logger.plots=false",
                                    f"hydra.run.dir={tmp_path / 'run'}"])
    assert summary["model"] == "GRUClassifier" and summary["data"] == "Sequences" and summary["epochs"] == 2
    assert summary["val_wrong"] == pytest.approx(1 - summary["val_acc"], abs=1e-6)
    assert len(history.history) == 2 and summary["epochs_seen_by_callback"] == 2
    assert calls == list(range(2, summary["steps"] + 1, 2))  # the step hook: log steps only
