"""Whole runs, end to end: the wall-clock time of a complete `torchrun -m dtrain` job (start-up, validation
every epoch, checkpoints, logs, the summary) against the hand-written DDP script (`plain.py`: start-up,
training, one final accuracy), run as separate commands, interleaved, the order alternating each round.
`benchmarks/steps.py` times training steps only (no validation, no checkpoints, no start-up); this is the
figure beside it that says what a whole run costs.

    python benchmarks/wholerun.py --rounds 5 --epochs 3            # 2 processes, mlp3 on the MNIST sample
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

ROOT = Path(__file__).resolve().parent.parent


def contestants(epochs: int, nproc: int, model: str, folder: Path) -> dict[str, list[str]]:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    dtrain = [*torchrun, "-m", "dtrain", f"model={model}", f"trainer.epochs={epochs}", "optim=adam", "optim.lr=1e-3",
              "data.batch_size=64", "logger.plots=false"]
    return {
        "plain DDP script": [*torchrun, str(ROOT / "benchmarks" / "plain.py"), "--model", model,
                             "--epochs", str(epochs)],
        "dtrain (validation, checkpoints every epoch)": [*dtrain, f"hydra.run.dir={folder}/a"],
        "dtrain, checkpoint.enabled=false": [*dtrain, "checkpoint.enabled=false", f"hydra.run.dir={folder}/b"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--model", default="mlp3")
    args = parser.parse_args()
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    times: dict[str, list[float]] = {}
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as folder:
            runs = list(contestants(args.epochs, args.nproc, args.model, Path(folder)).items())
            for name, cmd in runs if r % 2 == 0 else reversed(runs):
                start = time.perf_counter()
                subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
                times.setdefault(name, []).append(time.perf_counter() - start)
        print(f"round {r + 1}: " + ", ".join(f"{n} {t[-1]:.1f} s" for n, t in times.items()), flush=True)
    plain = times["plain DDP script"]
    print(f"\n{args.nproc} processes, {args.model}, {args.epochs} epochs, {args.rounds} rounds (wall-clock s)")
    print("| command | median | min-max | plain / it, median of rounds (min-max) |\n|---|---|---|---|")
    for name, t in times.items():
        ratios = [p / x for p, x in zip(plain, t)]
        print(f"| {name} | {statistics.median(t):.1f} | {min(t):.1f}-{max(t):.1f} | "
              f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
