"""Where one training step's time goes: dtrain's step against the strongest plain loop's
(`benchmarks/plain.py`), both in this process on the same model, data and batch, one warm-up epoch each,
then one profiled epoch each under torch.profiler and one under cProfile:

    python benchmarks/profile_step.py [--model lenet] [--batch 64]

Prints the time per step of each, the operators by self CPU time (torch.profiler), and dtrain's own
Python per step (cProfile: every function of dtrain's package, by cumulative time per step), which is
what dtrain adds to the plain loop's work.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


class Epoch:
    """What one profiled epoch needs: `run()` trains it and returns its optimizer steps."""

    def __init__(self, name: str, run):
        self.name, self.run = name, run


def plain_epochs(model: str, batch: int) -> Epoch:
    import plain
    loop = plain.Loop(plain.parse(["--model", model, "--batch", str(batch)]))
    counter = iter(range(1, 10**6))

    def run() -> int:
        loop.epoch(next(counter))
        return len(loop.train_y) // loop.per_rank
    loop.epoch(0)  # warm-up
    return Epoch("plain loop", run)


def dtrain_epochs(model: str, batch: int, folder: Path) -> Epoch:
    from dtrain import app, build
    from dtrain import world as w
    from dtrain.rundir import RunDir
    from dtrain.signals import StopSignal
    from dtrain.trainer import Trainer
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=app.CONF_DIR, version_base="1.3"):
        dcfg = compose("config", [f"model={model}", f"data.batch_size={batch}", "logger=none",
                                  "checkpoint.enabled=false", "trainer.epochs=1000"])
    cfg = app.make_config(dcfg)
    trainer = Trainer(build.parts(cfg, w.from_env("cpu", cfg.dist.backend, env={}), RunDir(folder, w.World())))
    stop = StopSignal(cfg.trainer.stop_grace_s)

    def run() -> int:
        first = trainer.progress.step
        trainer.progress.samples_in_epoch = 0
        trainer.train_epoch(stop)
        trainer.progress.epoch += 1
        return trainer.progress.step - first
    run()  # warm-up
    return Epoch("dtrain", run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ops", type=int, default=12, help="operators to list")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    with tempfile.TemporaryDirectory() as tmp:
        epochs = [plain_epochs(args.model, args.batch), dtrain_epochs(args.model, args.batch, Path(tmp))]
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.model}, batch {args.batch}\n")
        for e in epochs * 2:  # interleaved: plain, dtrain, plain, dtrain
            start = time.perf_counter()
            steps = e.run()
            print(f"{e.name}: {1e3 * (time.perf_counter() - start) / steps:.2f} ms per step (no profiler)")
        for e in epochs:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                steps = e.run()
            print(f"\n### {e.name}: torch.profiler, self CPU time per step by operator\n")
            print("| operator | calls per step | self CPU µs per step |\n|---|---|---|")
            rows = sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)[:args.ops]
            for a in rows:
                print(f"| `{a.key}` | {a.count / steps:.1f} | {a.self_cpu_time_total / steps:.0f} |")
        profiler = cProfile.Profile()
        dtrain = epochs[1]
        profiler.enable()
        steps = dtrain.run()
        profiler.disable()
        stats = pstats.Stats(profiler)
        print("\n### dtrain: its own Python per step (cProfile, cumulative, dtrain's functions only)\n")
        print("| function | calls per step | µs per step (cumulative) |\n|---|---|---|")
        own = [(f, s) for f, s in stats.stats.items() if "/dtrain/" in f[0] and "benchmarks" not in f[0]]
        for (file, line, name), (_, calls, _, cumulative, _) in sorted(own, key=lambda x: -x[1][3])[:15]:
            where = f"{Path(file).parent.name}/{Path(file).name}:{line} {name}"
            print(f"| `{where}` | {calls / steps:.2f} | {1e6 * cumulative / steps:.0f} |")


if __name__ == "__main__":
    main()
