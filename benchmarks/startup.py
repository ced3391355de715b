"""Start-up: how long `python -m dtrain` takes to its first optimizer step, beside what any PyTorch training
script pays before its first step (`import torch`, then building an optimizer, which imports
torch._dynamo), measured interleaved, each in a fresh process:

    python benchmarks/startup.py [--rounds 5]

The first step is timed by a callback (`FirstStep` below, given as `+callbacks.first_step._target_`) that
prints the wall clock at the first logged step; the driver subtracts the time it started the process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable
MARK = "FIRST_STEP_AT "


class FirstStep:
    """A dtrain callback: prints the wall clock at the first logged step (trainer.log_every_n_steps=1)."""

    def __init__(self):
        self.done = False

    def on_log_step(self, trainer, metrics: dict) -> None:
        if not self.done:
            print(f"{MARK}{time.time()}", flush=True)
            self.done = True


def seconds(command: list[str], first_step: bool) -> float:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(HERE)}
    start = time.time()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=HERE.parent, timeout=300)
    end = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    if not first_step:
        return end - start
    [line] = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    return float(line.removeprefix(MARK)) - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dtrain = [PY, "-m", "dtrain", "trainer.max_steps=1", "trainer.log_every_n_steps=1",
                  "+callbacks.first_step._target_=startup.FirstStep", "checkpoint.enabled=false", "logger.plots=false"]
        rows = {
            "python -c 'import torch'": ([PY, "-c", "import torch"], False),
            "import torch + build an Adam optimizer": (
                [PY, "-c", "import torch; torch.optim.Adam(torch.nn.Linear(1, 1).parameters())"], False),
            "python -m dtrain trainer.max_steps=1: first step": (dtrain, True),
            "python -m dtrain trainer.max_steps=1: exit (validation, test, summary)": (dtrain, False),
        }
        times: dict[str, list[float]] = {name: [] for name in rows}
        for r in range(args.rounds):
            for i, (name, (command, first)) in enumerate(list(rows.items())[::1 if r % 2 == 0 else -1]):
                extra = [f"hydra.run.dir={tmp}/run{r}-{i}"] if command is dtrain else []
                times[name].append(seconds(command + extra, first))
    import torch
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores; {args.rounds} rounds, interleaved\n")
    print("| what | seconds (median) | min–max |\n|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.2f} | {min(t):.2f}–{max(t):.2f} |")


if __name__ == "__main__":
    main()
