"""dtrain's training loop against a plain hand-written PyTorch loop, same model, data, batch and optimizer,
measured in the same process, one after the other, alternating, several repeats.

    python benchmarks/loop_overhead.py [--model mlp] [--epochs 2] [--repeats 3]

Prints a table of training samples/s (epoch time only, validation excluded, first epoch of each run
discarded as warm-up) and the ratio dtrain / plain. One process on the CPU or cuda:0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from dtrain import app, data, logs, models
from dtrain import world as w
from dtrain.app import CONF_DIR
from dtrain.config import Config
from dtrain.rundir import RunDir
from dtrain.trainer import Trainer


def make_config(model: str, epochs: int) -> Config:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        dcfg = compose("config", overrides=[f"model={model}", f"trainer.epochs={epochs}", "logger=none",
                                            "checkpoint.enabled=false", "trainer.log_every_n_steps=1000000"])
    return app.make_config(dcfg)


def plain_loop(cfg: Config, device: torch.device) -> float:
    """The loop a tutorial writes: DataLoader, forward, loss, backward, step. Returns samples/s."""
    torch.manual_seed(cfg.seed)
    splits = data.build(cfg.data, w.World(device=device))
    model = models.build(cfg.model.name, splits.task, splits.shape, splits.out, cfg.data.name).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    loader = torch.utils.data.DataLoader(splits.train, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True)
    rates = []
    for _ in range(cfg.trainer.epochs):
        model.train()
        start, n = time.perf_counter(), 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += len(y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - start))
    return statistics.mean(rates[1:])  # the first epoch warms up


def dtrain_loop(cfg: Config, device: torch.device) -> float:
    world = w.World(device=device)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, world, RunDir(Path(tmp), world))
        rates = []
        original = trainer.log_epoch
        trainer.log_epoch = lambda train, val, t: (rates.append(train["samples"] / t), original(train, val, t))
        trainer.fit()
        trainer.close()
    return statistics.mean(rates[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--epochs", type=int, default=3, help="per run; the first is warm-up")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    logs.close_console()
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    cfg = make_config(args.model, args.epochs)
    plain, ours = [], []
    for _ in range(args.repeats):  # alternate so drift in machine load hits both alike
        plain.append(plain_loop(cfg, device))
        ours.append(dtrain_loop(cfg, device))
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"model={args.model} data={cfg.data.name} batch={cfg.data.batch_size} device={name} "
          f"torch={torch.__version__} repeats={args.repeats}")
    print("| loop | samples/s (median) | min | max |\n|---|---|---|---|")
    for label, r in (("plain PyTorch", plain), ("dtrain", ours)):
        print(f"| {label} | {statistics.median(r):,.0f} | {min(r):,.0f} | {max(r):,.0f} |")
    print(f"\nratio dtrain / plain (median): {statistics.median(ours) / statistics.median(plain):.2f}")


if __name__ == "__main__":
    sys.exit(main())
