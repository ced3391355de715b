"""What the framework's seams (strategy, callbacks, `_target_` plug-ins, composition root) cost per step:
dtrain from this tree against dtrain from another checkout (`--baseline`, say the commit before them), the
same job, interleaved in one run (each in its own process, every tree once per round).

    git worktree add /tmp/before <commit>
    python benchmarks/seams.py --baseline /tmp/before [--models mlp3 lenet] [--epochs 3] [--rounds 3]

Samples/s (global) of a run is the mean over its epochs after the first; the table shows the median over
rounds with min-max and this tree's ratio to the baseline, for one process and for 2-process DDP.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable
TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def run_one(tree: Path, processes: int, model: str, epochs: int, batch: int) -> float:
    """One run of `python -m dtrain` (or 2 under torchrun) from `tree`; its samples/s after the first epoch."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [*(TORCHRUN if processes > 1 else [PY]), "-m", "dtrain", f"model={model}", f"trainer.epochs={epochs}",
               f"data.batch_size={batch}", "checkpoint.enabled=false", "logger.plots=false", f"hydra.run.dir={tmp}/run"]
        env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(tree)}
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} in {tree} failed:\n{proc.stderr[-3000:]}")
        epochs_seen = [json.loads(line) for line in Path(tmp, "run", "metrics.jsonl").read_text().splitlines()]
        return statistics.mean(e["samples_per_sec"] for e in epochs_seen[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="a checkout of the dtrain to compare with")
    parser.add_argument("--models", nargs="+", default=["mlp3", "lenet"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    trees = {"this tree": HERE.parent, "baseline": args.baseline.resolve()}
    print("| model | processes | this tree (samples/s) | baseline (samples/s) | ratio |\n|---|---|---|---|---|")
    for model in args.models:
        for processes in (1, 2):
            seen: dict[str, list[float]] = {name: [] for name in trees}
            for _ in range(args.rounds):
                for name, tree in trees.items():
                    seen[name].append(run_one(tree, processes, model, args.epochs, args.batch))
            med = {n: statistics.median(v) for n, v in seen.items()}
            cells = [f"{med[n]:,.0f} ({min(v):,.0f}-{max(v):,.0f})" for n, v in seen.items()]
            print(f"| {model} | {processes} | {cells[0]} | {cells[1]} | {med['this tree'] / med['baseline']:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
