"""DDP against FSDP on a model of 53.6 M parameters (benchmarks/wide.py) with 2 and 4 processes on this
machine's CPUs: what one rank holds (parameters, gradients, optimizer state: `state_bytes_per_rank`), each
process's peak resident memory, training samples/s, and how long a checkpoint stalls the loop, written
synchronously or in the background (`checkpoint.async_save`).

    python benchmarks/sharding.py [--steps 12] [--every 4] [--processes 2 4]

Every run trains the same job (synthetic 1x28x28 inputs, 10 classes, Adam, global batch 64, fp32) for
`--steps` steps with a checkpoint every `--every` steps; samples/s is the run's own (evaluation excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
JOB = ("model=mlp", "model._target_=wide.wide_mlp", "~model.dropout", "data=synthetic", "data.shape=[1,28,28]",
       "data.num_samples=2048", "data.batch_size=64", "data.eval_batch_size=256", "trainer.epochs=1",
       "logger.plots=false", "trainer.log_every_n_steps=1000")


def run(processes: int, strategy: str, steps: int, every: int, asynchronous: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "dtrain", *JOB, f"dist.strategy={strategy}", "checkpoint.format=dcp",
               f"checkpoint.async_save={str(asynchronous).lower()}", f"trainer.max_steps={steps}",
               f"checkpoint.every_n_steps={every}", "checkpoint.keep_last=1", f"hydra.run.dir={tmp}/run"]
        env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        summary = json.loads(Path(tmp, "run", "summary.json").read_text())
        epochs = [json.loads(line) for line in Path(tmp, "run", "metrics.jsonl").read_text().splitlines()]
        return {"held": summary["state_bytes_per_rank"], "rss": summary["peak_rss_bytes"],
                "samples_per_sec": summary["samples_per_sec"],
                "stall_per_save": sum(e["checkpoint_stall_s"] for e in epochs) / (steps // every)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--processes", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    mb = 2 ** 20
    print("| processes | strategy | save | state per rank (MB): params / grads / optim / total | vs DDP | "
          "peak RSS (MB) | samples/s | stall per save (s) |\n|---|---|---|---|---|---|---|---|")
    for n in args.processes:
        ddp_total = None
        for strategy, asynchronous in (("ddp", False), ("fsdp", False), ("fsdp", True)):
            r = run(n, strategy, args.steps, args.every, asynchronous)
            h = r["held"]
            ddp_total = ddp_total or h["total"]
            print(f"| {n} | {strategy} | {'async' if asynchronous else 'sync'} | {h['parameters'] / mb:.0f} / "
                  f"{h['gradients'] / mb:.0f} / {h['optimizer'] / mb:.0f} / {h['total'] / mb:.0f} | "
                  f"{h['total'] / ddp_total:.2f}x | {r['rss'] / mb:.0f} | {r['samples_per_sec']:.1f} | "
                  f"{r['stall_per_save']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
