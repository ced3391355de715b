"""Rank-aware logging and observability: per-rank logs, the console, each metric sink's content read back,
plots, the profiler, throughput and FLOPs."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CHILD_ENV, ROOT, make_trainer, run_cli

WANDB_OFFLINE = {"WANDB_MODE": "offline"}


# -- reading back what the sinks wrote -------------------------------------------------------------

def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def expected_size(name: str) -> tuple[int, int]:
    from dtrain.plots import DPI, SIZES
    w, h = SIZES[name]
    return round(w * DPI), round(h * DPI)


def wandb_records(run_file: Path) -> list:
    """The records of an offline wandb run file (LevelDB log format: 7-byte file header, 32 KiB blocks,
    records with a 7-byte header: crc32c, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, records, pos, payload = run_file.read_bytes(), [], 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pb.Record.FromString(payload))
            payload = b""
    return records


def wandb_run(folder: Path) -> dict:
    """One offline wandb run's id, config, logged rows and summary."""
    [run_file] = folder.glob("run-*.wandb")
    out = {"id": None, "config": {}, "history": [], "summary": {}}
    for r in wandb_records(run_file):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["id"] = r.run.run_id
            out["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in r.summary.update})
    return out


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tensorboard_hparams(folder: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    acc = EventAccumulator(str(folder))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    values = session.session_start_info.hparams
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    return {"hparams": {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in values.items()},
            "metrics": [m.name.tag for m in experiment.metric_infos]}


# -- under torchrun: one set of shared files, a log per rank -----------------------------------------

@pytest.mark.slow
def test_two_ranks_write_one_set_of_shared_files_one_wandb_run_and_a_log_and_trace_each(tmp_path):
    run = run_cli(tmp_path / "run", "logger=all", "trainer.epochs=2", "trainer.profile=true",
                  "trainer.log_every_n_steps=20", nproc=2, env=WANDB_OFFLINE)
    assert run.code == 0, run
    # Each rank its own log, each record naming its rank (the end-of-run report continues on more lines).
    for rank in (0, 1):
        records = [line for line in (run.dir / f"rank{rank}.log").read_text().splitlines()
                   if re.match(r"\d{4}-\d\d-\d\d \d\d:", line)]
        assert records and all(f" [rank {rank}] " in line for line in records)
    assert "epoch 2 step" in (run.dir / "rank0.log").read_text()  # the console's lines, on rank 0
    assert not list(run.dir.glob("rank[2-9]*.log"))
    # Shared files once: two epochs in metrics.jsonl, one wandb run, one TensorBoard run.
    assert [m["epoch"] for m in run.metrics] == [1, 2]  # counted as people count
    [wandb_folder] = (run.dir / "wandb").glob("offline-run-*")
    assert len(tensorboard_scalars(run.dir / "tensorboard")["val/acc"]) == 2
    recorded = wandb_run(wandb_folder)
    assert recorded["config"]["trainer"]["profile"] is True
    assert [h["val/acc"] for h in recorded["history"] if "val/acc" in h] == [m["val_acc"] for m in run.metrics]
    # A profiler trace per rank, each a Chrome/Perfetto trace of real operators.
    for rank in (0, 1):
        [trace] = (run.dir / "profile").glob(f"rank{rank}.*.pt.trace.json")
        names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
        assert "aten::addmm" in names or "aten::mm" in names
    assert run.summary["world_size"] == 2 and run.summary["samples_per_sec"] > 0


# -- the console ------------------------------------------------------------------------------------

@pytest.mark.unit
def test_other_ranks_reach_the_console_with_errors_always_and_each_warning_once(tmp_path, capsys):
    from dtrain import logs
    from dtrain import world as w
    from dtrain.rundir import RunDir
    world = w.World(rank=1, world_size=2)
    logs.setup_console(world, RunDir(tmp_path, world))
    try:
        logs.log.info("progress")
        for _ in range(3):
            logs.log.warning("data loader is slow")
        logs.log.error("failed")
        logs.log.error("failed")
    finally:
        logs.close_console()
    err = capsys.readouterr().err.splitlines()
    assert err == ["[rank 1] data loader is slow", "[rank 1] failed", "[rank 1] failed"]
    logged = (tmp_path / "rank1.log").read_text()
    assert logged.count("[rank 1] WARNING data loader is slow") == 3 and "[rank 1] INFO progress" in logged


@pytest.mark.unit
def test_python_warnings_reach_the_rank_log(tmp_path):
    import warnings
    from dtrain import logs
    from dtrain import world as w
    from dtrain.rundir import RunDir
    logs.setup_console(w.World(), RunDir(tmp_path, w.World()))
    try:
        warnings.warn("a deprecated thing", UserWarning)
    finally:
        logs.close_console()
    assert "a deprecated thing" in (tmp_path / "rank0.log").read_text()


def test_without_a_terminal_step_lines_replace_the_progress_bar_and_a_report_ends_the_run(tmp_path):
    run = run_cli(tmp_path / "run", "trainer.epochs=1", "trainer.log_every_n_steps=40")
    assert run.code == 0, run
    steps = [line for line in run.out.splitlines() if line.startswith("  epoch 1 step")]
    assert len(steps) == 140 // 40 and all("/140 loss" in line for line in steps)
    assert "samples_per_sec" in steps[-1] and " eta " in steps[-1]
    assert "it/s" not in run.err and "step/s" not in run.err  # no bar
    report = run.out[run.out.index("summary:"):]
    for part in ("done in", "val   loss", "acc", "best  val_acc", "samples/s", "GFLOP/s", "ckpt ", "curves.png"):
        assert part in report, part


def test_a_forced_progress_bar_shows_epoch_loss_lr_and_throughput(tmp_path):
    run = run_cli(tmp_path / "run", "trainer.epochs=2", "logger.progress_bar=true", "trainer.log_every_n_steps=10")
    assert run.code == 0, run
    bar = run.err.replace("\r", "\n")
    assert "epoch 2/2" in bar and "280/280" in bar and "loss=" in bar and "lr=" in bar and "samples_per_sec=" in bar
    assert "step/s" in bar or "s/step" in bar  # tqdm's rate and ETA
    assert "val:" in bar and "batch" in bar  # evaluation has its own
    assert not [line for line in run.out.splitlines() if line.startswith("  epoch")]  # the bar replaced them
    assert "epoch 2 step 280 |" in run.out  # epoch lines stay


@pytest.mark.unit
def test_the_bar_follows_the_terminal_unless_set(tmp_path, monkeypatch, quiet_logs):
    from dtrain.sinks import ConsoleSink
    trainer = make_trainer(tmp_path, "debug=fast")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    logger = trainer.config.logger  # the run's own config (trainer.cfg is the callbacks' read-only view)
    assert ConsoleSink(trainer.run, logger, trainer.logger.context).show_bar
    logger.progress_bar = False
    assert not ConsoleSink(trainer.run, logger, trainer.logger.context).show_bar
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    logger.progress_bar = None
    assert not ConsoleSink(trainer.run, logger, trainer.logger.context).show_bar


# -- sinks ------------------------------------------------------------------------------------------

def test_tensorboard_holds_step_and_epoch_scalars_and_the_hparams_with_final_metrics(tmp_path, quiet_logs):
    trainer = make_trainer(tmp_path, "logger=tensorboard", "trainer.epochs=2", "trainer.log_every_n_steps=50",
                           "optim.lr=0.002")
    summary = trainer.fit()
    trainer.close()
    epochs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["val/acc"] == [(e["step"], pytest.approx(e["val_acc"])) for e in epochs]
    assert scalars["train/loss"] == [(e["step"], pytest.approx(e["train_loss"])) for e in epochs]
    assert [s for s, _ in scalars["step/loss"]] == list(range(50, 281, 50))
    assert scalars["epoch/samples_per_sec"][0][1] > 0
    hp = tensorboard_hparams(tmp_path / "tensorboard")
    assert hp["hparams"]["optim.lr"] == pytest.approx(0.002) and hp["hparams"]["model.name"] == "mlp"
    assert "final/val_acc" in hp["metrics"]
    assert scalars["final/val_acc"][-1][1] == pytest.approx(summary["val_acc"])


@pytest.mark.slow  # in CI's slow tier: the default tier stays under 10 minutes
def test_wandb_offline_records_config_metrics_and_summary_and_a_resumed_job_continues_its_run(tmp_path):
    first = run_cli(tmp_path / "run", "logger=wandb", "trainer.epochs=1", env=WANDB_OFFLINE)
    assert first.code == 0, first
    second = run_cli(tmp_path / "run", "logger=wandb", "trainer.epochs=2", "checkpoint.allow_config_change=true",
                     env=WANDB_OFFLINE)  # one more epoch
    assert second.code == 0, second
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # wandb writes one folder per process, both for the same run id
    a, b = wandb_run(runs[0]), wandb_run(runs[1])
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert a["id"] == b["id"] == ckpt["logger"]["wandb_run_id"]
    assert a["config"]["optim"]["lr"] == 0.001 and a["config"]["model"]["name"] == "mlp"
    assert [h["epoch/epoch"] for h in a["history"] + b["history"] if "val/acc" in h] == [1, 2]
    assert any("step/loss" in h for h in a["history"])
    assert b["summary"]["val_acc"] == pytest.approx(second.summary["val_acc"])


def test_wandb_online_without_a_key_records_offline_and_says_so(tmp_path):
    env = {"WANDB_MODE": "", "WANDB_API_KEY": "", "HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path)}
    run = run_cli(tmp_path / "run", "logger=wandb", "logger.wandb_mode=online", "debug=fast", env=env)
    assert run.code == 0, run
    assert "wandb: could not start online" in run.out and "recording offline" in run.out
    assert len(list((run.dir / "wandb").glob("offline-run-*"))) == 1


# -- plots ------------------------------------------------------------------------------------------

def test_a_run_draws_its_curves_confusion_matrix_and_samples_and_the_command_redraws_them(tmp_path):
    run = run_cli(tmp_path / "run", "trainer.epochs=2")
    assert run.code == 0, run
    for name in ("curves.png", "confusion.png", "samples.png"):
        assert png_size(run.dir / name) == expected_size(name), name
    confusion = json.loads((run.dir / "confusion.json").read_text())
    matrix = torch.tensor(confusion["matrix"])
    assert confusion["classes"] == [str(i) for i in range(10)] and matrix.sum() == run.summary["val_samples"]
    assert matrix.trace() / matrix.sum() == pytest.approx(run.summary["val_acc"])
    for name in ("curves.png", "confusion.png", "samples.png"):
        (run.dir / name).unlink()
    redraw = subprocess.run([sys.executable, "-m", "dtrain.plots", "redraw", str(run.dir)], cwd=ROOT,
                            env=CHILD_ENV, capture_output=True, text=True, timeout=120)
    assert redraw.returncode == 0, redraw.stderr
    for name in ("curves.png", "confusion.png", "samples.png"):
        assert png_size(run.dir / name) == expected_size(name), name


def test_compare_draws_several_runs_in_one_figure_and_refuses_a_folder_without_results(tmp_path):
    from dtrain import plots
    for name, acc in (("a", [0.5, 0.7]), ("b", [0.6, 0.9])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(
            json.dumps({"epoch": e, "step": 10 * (e + 1), "train_loss": 1.0, "val_loss": 1 - a, "val_acc": a,
                        "lr": 0.1}) + "\n" for e, a in enumerate(acc)))
    out = plots.compare([tmp_path / "a", tmp_path / "b"], tmp_path / "compare.png")
    assert png_size(out) == expected_size("compare")
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-m", "dtrain.plots", "compare", str(tmp_path / "a"),
                           str(tmp_path / "empty")], cwd=tmp_path, env=CHILD_ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no metrics.jsonl" in proc.stderr
    assert plots.main(["redraw", str(tmp_path / "empty")]) == 2
    assert not list((tmp_path / "empty").iterdir())


def test_regression_runs_draw_curves_without_a_confusion_matrix(tmp_path, quiet_logs):
    trainer = make_trainer(tmp_path, "data=regression", "model=linear", "trainer.epochs=2")
    trainer.fit()
    trainer.close()
    assert png_size(tmp_path / "curves.png") == expected_size("curves.png")
    assert not (tmp_path / "confusion.png").exists() and not (tmp_path / "samples.png").exists()


# -- throughput and FLOPs ---------------------------------------------------------------------------

# FLOPs to train on one sample, counted by hand: a Linear(a, b) forward is 2*a*b FLOPs (a multiply and an
# add per weight; the bias add is not counted), training about 3 forwards (the backward costs two).
HAND_COUNTED = {
    "mlp3": (("model=mlp3", "data=synthetic", "data.shape=[1,12,12]", "data.num_samples=400"),
             3 * 2 * (144 * 128 + 128 * 64 + 64 * 10)),  # 163,584: 144 -> 128 -> 64 -> 10
    "linear": (("model=linear", "data=regression", "data.shape=[8]", "data.num_samples=400"), 3 * 2 * 8 * 1),  # 48
}


@pytest.mark.unit
def test_mfu_is_the_flops_trained_over_the_peak_of_every_rank(monkeypatch):
    """On a GPU whose name is in perf.PEAK_FLOPS (no GPU needed: the name is all it reads), for the precision
    trained in; the throughput is every rank's samples, so the peak is the world's."""
    from dtrain import callbacks, perf
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert perf.peak_flops(torch.device("cuda"), True) == 989e12  # bf16/fp16 dense
    assert perf.peak_flops(torch.device("cuda"), False) == 67e12
    throughput = callbacks.Throughput(None, True)
    throughput.flops_per_sample, throughput.peak = 3e9, 989e12
    metrics = {"samples_per_sec": 8_000.0}
    throughput.add(metrics, world_size=4)
    assert metrics["flops_per_sec"] == 2.4e13 and metrics["mfu"] == pytest.approx(2.4e13 / (4 * 989e12))


@pytest.mark.parametrize("name", sorted(HAND_COUNTED))
def test_flops_are_counted_from_the_model_and_reported_per_epoch_and_in_the_summary(tmp_path, quiet_logs, name):
    from dtrain import perf
    overrides, flops = HAND_COUNTED[name]
    trainer = make_trainer(tmp_path, *overrides, "data.batch_size=40", "trainer.epochs=2", "logger.plots=false",
                           "trainer.device=cpu", "checkpoint.enabled=false")
    summary = trainer.fit()
    trainer.close()
    assert trainer.callbacks.named["throughput"].flops_per_sample == flops  # a built-in callback
    epochs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == 2
    for reported in (*epochs, summary):
        assert reported["samples_per_sec"] > 0
        assert reported["flops_per_sec"] == pytest.approx(flops * reported["samples_per_sec"], rel=1e-9)
    assert summary["step_time_s"] > 0 and "mfu" not in summary  # no GPU peak on a CPU
    assert perf.peak_flops(torch.device("cpu"), True) is None


@pytest.mark.unit
def test_the_gpu_peak_table_matches_the_most_specific_name(monkeypatch):
    from dtrain import perf
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert perf.peak_flops(torch.device("cuda"), True) == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert perf.peak_flops(torch.device("cuda"), False) == 51e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert perf.peak_flops(torch.device("cuda"), True) is None


def test_a_single_process_profile_writes_one_trace_perfetto_can_open(tmp_path, quiet_logs):
    trainer = make_trainer(tmp_path, "trainer.profile=true", "trainer.max_steps=20", "trainer.log_every_n_steps=4",
                           "logger=none")
    trainer.fit()
    trainer.close()
    [trace] = (tmp_path / "profile").glob("rank0.*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    # From the first step to the first log step at least 3 steps in: steps 1-4, each with its optimizer step.
    assert sum(e.get("name", "").startswith("Optimizer.step#Adam.step") for e in events) == 4
