"""Helpers shared by the tests: compose the real config, build a trainer in-process, run the real CLI."""

from __future__ import annotations

import os

# Every default-tier test runs on the CPU whatever the host has: CUDA is hidden from this process and from
# every process it starts (CHILD_ENV copies os.environ), before torch first looks for a device. Tests
# marked `gpu` need DTRAIN_TEST_CUDA=1 (`DTRAIN_TEST_CUDA=1 pytest -m gpu`) and skip, saying so, without it.
if os.environ.get("DTRAIN_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dtrain import app
from dtrain.app import CONF_DIR
from dtrain.config import Config

ROOT = Path(__file__).resolve().parent.parent
# Child processes: quiet, offline, one thread each (2 cores are shared by up to 4 processes).
CHILD_ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
             "HYDRA_FULL_ERROR": "0"}
CHILD_ENV.pop("DTRAIN_RUN_ID", None)


def pytest_collection_modifyitems(config, items):
    """A `gpu` test without a visible CUDA device is skipped with the reason (never silently passed)."""
    import torch
    if torch.cuda.is_available():
        return
    why = ("needs a CUDA device; the tests hide CUDA unless DTRAIN_TEST_CUDA=1 (DTRAIN_TEST_CUDA=1 pytest -m gpu)"
           if os.environ.get("DTRAIN_TEST_CUDA") != "1" else "needs a CUDA device, and this host has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=why))


def compose_dcfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def make_config(*overrides: str) -> Config:
    """The real composed config with `overrides`, typed and validated."""
    return app.make_config(compose_dcfg(*overrides))


MADE_TRAINERS: list = []  # this test's (their data workers end with it)


def make_trainer(tmp_path: Path, *overrides: str, world=None):
    from dtrain import build
    from dtrain import world as w
    from dtrain.rundir import RunDir
    from dtrain.trainer import Trainer
    cfg = make_config(*overrides)
    tmp_path.mkdir(parents=True, exist_ok=True)  # Hydra makes the run folder in a real run
    world = world or w.from_env(cfg.trainer.device, cfg.dist.backend, env={})
    trainer = Trainer(build.parts(cfg, world, RunDir(tmp_path, world)))
    MADE_TRAINERS.append(trainer)
    return trainer


@pytest.fixture(autouse=True)
def end_data_workers():
    """The data workers of the trainers a test made end with it, as a run's own close ends them: a trainer a
    test drops would leave them to garbage collection, 10 s per loader, in some later test."""
    yield
    while MADE_TRAINERS:
        MADE_TRAINERS.pop().loaders.close()


class Run:
    """A finished CLI run: exit code, output, and its run folder's files."""

    def __init__(self, proc: subprocess.CompletedProcess, run_dir: Path):
        self.code, self.out, self.err, self.dir = proc.returncode, proc.stdout, proc.stderr, run_dir

    @property
    def summary(self) -> dict:
        return json.loads((self.dir / "summary.json").read_text())

    @property
    def metrics(self) -> list[dict]:
        return [json.loads(line) for line in (self.dir / "metrics.jsonl").read_text().splitlines()]

    def __repr__(self) -> str:  # shown when an assertion fails
        return f"Run(code={self.code})\n--- stdout\n{self.out[-3000:]}\n--- stderr\n{self.err[-5000:]}"


def run_cli(run_dir: Path, *overrides: str, nproc: int = 1, timeout: float = 240, env: dict | None = None,
            target: tuple[str, ...] = ("-m", "dtrain"), launcher: list[str] | None = None) -> Run:
    """`python -m dtrain` (nproc=1) or `torchrun --standalone --nproc_per_node=N -m dtrain`, with
    `hydra.run.dir=run_dir`. `target=(FAULTS,)` runs the fault-injecting wrapper instead."""
    if launcher is None:
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                     f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable])
    cmd = [*launcher, *target, *overrides]
    if not any(o.startswith("hydra.run.dir=") for o in overrides):
        cmd.append(f"hydra.run.dir={run_dir}")
    proc = subprocess.run(cmd, cwd=ROOT, env={**CHILD_ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    return Run(proc, run_dir)


FAULTS = str(ROOT / "tests" / "faults.py")


def final_state(run: Run) -> dict:
    """The model weights of a run's newest checkpoint."""
    import torch
    name = (run.dir / "checkpoints" / "latest").read_text().strip()
    return torch.load(run.dir / "checkpoints" / name, weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict, rtol=1e-5, atol=1e-6) -> None:
    import torch
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


@pytest.fixture
def quiet_logs():
    """Silence the dtrain logger's handlers between in-process trainers."""
    from dtrain import logs
    yield
    logs.close_console()


def params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def load_yaml(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path))


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Live:
    """A dtrain command running in its own session (as under SLURM, `timeout`, a terminal or a container
    runtime), so a signal can be sent to its whole process group, DataLoader workers included."""

    def __init__(self, *args: str, cwd: Path = ROOT, env: dict | None = None):
        import threading
        self.proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env={**CHILD_ENV, **(env or {})},
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                         for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    def wait_for(self, text: str, timeout: float = 120) -> None:
        """Until `text` appears in stdout or stderr (fails if the process ends first or time runs out)."""
        import time
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.out + self.err):
            assert self.proc.poll() is None, f"ended before printing {text!r}: {self}"
            assert time.monotonic() < deadline, f"no {text!r} within {timeout} s: {self}"
            time.sleep(0.05)

    def signal_group(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def finish(self, timeout: float = 120) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            raise AssertionError(f"still running {timeout} s later: {self}") from None
        for t in self._threads:
            t.join(5)
        return code

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def __repr__(self) -> str:
        return f"Live(code={self.proc.poll()})\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-5000:]}"


def write_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 20, size=(40, 30)) -> Path:
    """root/train/<class>/<i>.png: small RGB PNGs whose colour depends on the class (learnable)."""
    from PIL import Image
    for c, label in enumerate(classes):
        folder = root / "train" / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", size, (i * 10 % 256, 80 + 120 * c, 50)).save(folder / f"{i}.png")
    return root


def crash_after_step(monkeypatch, step: int):
    """Make the trainer raise right after optimizer step `step`; returns what undoes it."""
    from dtrain import trainer as trainer_mod
    original = trainer_mod.Trainer.optimizer_step

    def crashing(self):
        original(self)
        if self.progress.step == step:
            raise RuntimeError("crash")

    monkeypatch.setattr(trainer_mod.Trainer, "optimizer_step", crashing)
    return lambda: monkeypatch.setattr(trainer_mod.Trainer, "optimizer_step", original)
