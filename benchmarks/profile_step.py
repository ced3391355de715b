"""Where one training step's time goes: dtrain's step against the strongest plain loop's
(`benchmarks/plain.py`), both in this process as benchmarks/steps.py builds them, one warm-up epoch each,
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

from steps import dtrain_epochs, plain_epochs  # noqa: E402  (benchmarks/ is not a package)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ops", type=int, default=12, help="operators to list")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    with tempfile.TemporaryDirectory() as tmp:
        epochs = [plain_epochs(args.model, args.batch), dtrain_epochs(args.model, args.batch, Path(tmp))]
        for e in epochs:
            e.run()  # warm-up
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.model}, batch {args.batch}\n")
        for e in epochs * 2:  # interleaved: plain, dtrain, plain, dtrain
            start = time.perf_counter()
            steps = e.run() // args.batch  # samples -> optimizer steps (one process)
            print(f"{e.name}: {1e3 * (time.perf_counter() - start) / steps:.2f} ms per step (no profiler)")
        for e in epochs:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                steps = e.run() // args.batch  # samples -> optimizer steps (one process)
            print(f"\n### {e.name}: torch.profiler, self CPU time per step by operator\n")
            print("| operator | calls per step | self CPU µs per step |\n|---|---|---|")
            rows = sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)[:args.ops]
            for a in rows:
                print(f"| `{a.key}` | {a.count / steps:.1f} | {a.self_cpu_time_total / steps:.0f} |")
        profiler = cProfile.Profile()
        dtrain = epochs[1]
        profiler.enable()
        steps = dtrain.run() // args.batch
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
