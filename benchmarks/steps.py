"""A dtrain step against a step of the strongest plain loop (`benchmarks/plain.py`), paired: both train in
the same process(es), on the same model, data and batch, their epochs alternating (plain, dtrain, dtrain,
plain, ...), so each pair of neighbouring epochs saw the same machine at the same moments and gives one
ratio of samples/s. On a shared machine whose speed drifts by tens of percent between runs minutes apart,
only such pairs resolve a difference of a few percent; separate processes (benchmarks/throughput.py's
table) measure everything else a user sees, start-up aside.

    python benchmarks/steps.py --model mlp3 --pairs 40
    torchrun --standalone --nproc_per_node=2 benchmarks/steps.py --model mlp3   # DDP against plain DDP
    python benchmarks/steps.py --device cuda --precision bf16
    torchrun --standalone --nproc_per_node=2 benchmarks/steps.py --variant trainer.sync_every_n_steps=100000
                                        # a third contestant: dtrain with these overrides (an ablation)

dtrain runs as `python -m dtrain` would with throughput.py's overrides (logger on, plots and checkpoints
off): its loader, loss, accuracy sums, optimizer step, schedule, logging every `log_every_n_steps` and the
stop-flag agreement every `sync_every_n_steps`. Prints one line `RESULT {json}` (rank 0): the pair ratios
(dtrain / plain) and each loop's samples/s per epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

OVERRIDES = ["checkpoint.enabled=false", "logger.plots=false"]  # what throughput.py gives `python -m dtrain`


class Epochs:
    """One contestant: `run()` trains one epoch and returns the samples it trained on (this rank's)."""

    def __init__(self, name: str, run: Callable[[], int]):
        self.name, self.run = name, run


def plain_epochs(model: str, batch: int, device: str = "cpu", precision: str = "fp32") -> Epochs:
    """The plain loop (plain.Loop), in this process and its group if there is one."""
    import plain
    loop = plain.Loop(plain.parse(["--model", model, "--batch", str(batch), "--device", device,
                                   "--precision", precision]))
    counter = iter(range(10**9))

    def run() -> int:
        loop.epoch(next(counter))
        return len(loop.train_y) // loop.world // loop.per_rank * loop.per_rank
    return Epochs("plain loop", run)


def dtrain_epochs(model: str, batch: int, folder: Path, device: str = "cpu", precision: str = "fp32",
                  overrides: tuple[str, ...] = ()) -> Epochs:
    """dtrain's Trainer as `python -m dtrain` builds it (its world from this process's environment: under
    torchrun the process group must already be formed), one `train_epoch` per run."""
    from hydra import compose, initialize_config_dir

    from dtrain import app, build
    from dtrain import world as w
    from dtrain.rundir import RunDir
    from dtrain.signals import StopSignal
    from dtrain.trainer import Trainer
    with initialize_config_dir(config_dir=app.CONF_DIR, version_base="1.3"):
        dcfg = compose("config", [f"model={model}", f"data.batch_size={batch}", f"trainer.device={device}",
                                  f"trainer.precision={precision}", "trainer.epochs=1000000", *OVERRIDES,
                                  *overrides])
    cfg = app.make_config(dcfg)
    world = w.from_env(cfg.trainer.device, cfg.dist.backend)
    trainer = Trainer(build.parts(cfg, world, RunDir(folder, world)))
    stop = StopSignal(cfg.trainer.stop_grace_s)

    def run() -> int:
        p = trainer.progress
        first, p.samples_in_epoch = p.step, 0
        trainer.train_epoch(stop)
        p.epoch += 1
        return (p.step - first) * (batch // world.world_size)
    return Epochs("dtrain", run)


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def paired(contestants: list[Epochs], pairs: int) -> dict[str, list[float]]:
    """samples/s of every epoch of each (this rank's samples times the world size), after one warm-up
    epoch each; the order alternates so neither always runs first."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    for c in contestants:
        c.run()
    rates: dict[str, list[float]] = {c.name: [] for c in contestants}
    for i in range(pairs):
        for c in contestants if i % 2 == 0 else contestants[::-1]:
            synchronize()
            start = time.perf_counter()
            samples = c.run()
            synchronize()
            rates[c.name].append(samples * world / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mlp3")
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--variant", action="append", default=[], metavar="OVERRIDES",
                        help="also dtrain with these further overrides (space-separated), in the same pairs")
    parser.add_argument("overrides", nargs="*", help="more dtrain overrides (trainer.sync_every_n_steps=1, say)")
    args = parser.parse_args()
    from dtrain import world as w
    world = w.from_env(args.device, "auto")
    with w.process_group(world, timeout_s=600), tempfile.TemporaryDirectory() as tmp:
        contestants = [plain_epochs(args.model, args.batch, args.device, args.precision),
                       dtrain_epochs(args.model, args.batch, Path(tmp), args.device, args.precision,
                                     tuple(args.overrides))]
        for i, variant in enumerate(args.variant):
            extra = dtrain_epochs(args.model, args.batch, Path(tmp) / str(i), args.device, args.precision,
                                  (*args.overrides, *variant.split()))
            contestants.append(Epochs(f"dtrain {variant}", extra.run))
        rates = paired(contestants, args.pairs)
    ratios = {c.name: [d / p for d, p in zip(rates[c.name], rates["plain loop"])] for c in contestants[1:]}
    if world.is_main:
        for name, r in ratios.items():
            quartiles = statistics.quantiles(r, n=4)
            print(f"{args.model}, {world.world_size} process(es), {args.pairs} pairs: {name} / plain loop "
                  f"{statistics.median(r):.3f} (quartiles {quartiles[0]:.3f}–{quartiles[2]:.3f})", file=sys.stderr)
        print("RESULT " + json.dumps({"ratios": ratios.pop("dtrain"), "variants": ratios, "samples_per_sec": rates}),
              flush=True)


if __name__ == "__main__":
    main()
