"""Training throughput of dtrain against what a user would otherwise write or pick, same model, data,
optimizer (Adam 1e-3) and global batch, measured in one run, interleaved (every contestant once per round,
several rounds), each in its own process:

    plain loop              benchmarks/plain.py: the strongest hand-written loop (preloaded normalised tensor,
                            index_select batches, fused Adam, no per-step host sync)
    tutorial loop           benchmarks/tutorial.py: torchvision data set + per-sample transforms + DataLoader
    dtrain                  python -m dtrain (its device-resident data path)
    Lightning               benchmarks/lightning_job.py (optional: pip install lightning)
    ... DDP                 the same with 2 processes (torchrun; Lightning's own DDP launcher), gloo on CPU;
                            with --device cuda one process per GPU, NCCL

    python benchmarks/throughput.py [--models mlp3 lenet] [--epochs 3] [--rounds 3] [--batch 64]
    python benchmarks/throughput.py --device cuda --precision bf16   # the whole table on the GPU(s)

Training samples/s (global) of each run is the mean over its epochs after the first (warm-up); the table
shows the median over rounds with min-max, the ratio to the plain loop of the same process count, and
the final validation accuracy of the last round.

Then the step itself, paired (benchmarks/steps.py): dtrain's epochs alternate with the plain loop's in the
same process (and in the same 2 processes under DDP), each neighbouring pair one ratio; the median over
`--pairs` pairs with its quartiles is checked against the targets (one process >= 0.95x the plain loop,
DDP >= 0.97x the plain DDP script). On a shared machine whose speed swings between runs minutes apart
(here the plain loop alone: 33k-90k samples/s on mlp3 within one process), the separate processes above
cannot resolve a few percent; the pairs can.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dtrain.config import TrainerConfig

HERE = Path(__file__).resolve().parent
PY = sys.executable
COMPILED = "dtrain, trainer.compile=true"
TARGETS = {1: 0.95, 2: 0.97}  # dtrain / plain loop, one process and DDP (issue 24)


def contestants(model: str, epochs: int, batch: int, device: str, precision: str, nproc: int,
                compiled: bool) -> list[tuple[str, int, list[str]]]:
    """(name, processes, command); the dtrain commands get hydra.run.dir appended. Without `nproc` > 1
    processes (fewer than 2 GPUs) the DDP rows are left out."""
    script = ["--model", model, "--epochs", str(epochs), "--batch", str(batch), "--device", device]
    low = ["--precision", precision]  # the contestants that take a precision (the tutorial loop is fp32)
    dtrain = ["-m", "dtrain", f"model={model}", f"trainer.epochs={epochs}", f"data.batch_size={batch}",
              f"trainer.device={device}", f"trainer.precision={precision}", "checkpoint.enabled=false",
              "logger.plots=false"]
    torchrun = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    rows = [("plain loop", 1, [PY, str(HERE / "plain.py"), *script, *low]),
            ("tutorial loop", 1, [PY, str(HERE / "tutorial.py"), *script]),
            ("dtrain", 1, [PY, *dtrain])]
    if compiled:
        rows.append((COMPILED, 1, [PY, *dtrain, "trainer.compile=true"]))
    lightning = importlib.util.find_spec("lightning") is not None
    if lightning:
        rows.append(("Lightning", 1, [PY, str(HERE / "lightning_job.py"), *script, *low]))
    if nproc < 2:
        return rows
    rows += [("plain DDP script", nproc, [*torchrun, str(HERE / "plain.py"), *script, *low]),
             ("dtrain DDP", nproc, [*torchrun, *dtrain]),
             ("dtrain DDP, stop flag synced every step", nproc, [*torchrun, *dtrain, "trainer.sync_every_n_steps=1"])]
    if lightning:
        rows.append(("Lightning DDP", nproc, [PY, str(HERE / "lightning_job.py"), *script, *low,
                                              "--devices", str(nproc)]))
    return rows


def run_one(command: list[str]) -> dict:
    """Run a contestant; its per-epoch samples/s and final validation accuracy."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(HERE)}
    with tempfile.TemporaryDirectory() as tmp:
        is_dtrain = "dtrain" in command
        if is_dtrain:
            command = [*command, f"hydra.run.dir={tmp}/run"]
        proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=HERE.parent, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        if is_dtrain:
            epochs = [json.loads(line) for line in Path(tmp, "run", "metrics.jsonl").read_text().splitlines()]
            summary = json.loads(Path(tmp, "run", "summary.json").read_text())
            return {"samples_per_sec": [e["samples_per_sec"] for e in epochs], "val_acc": summary["val_acc"],
                    "epoch_time_s": [e["epoch_time_s"] for e in epochs]}
    [line] = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


def paired(model: str, batch: int, device: str, precision: str, nproc: int, pairs: int) -> dict:
    """benchmarks/steps.py in one process, or in `nproc` under torchrun: its pair ratios."""
    launcher = [PY] if nproc == 1 else [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return run_one([*launcher, str(HERE / "steps.py"), "--model", model, "--batch", str(batch), "--device", device,
                    "--precision", precision, "--pairs", str(pairs)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp3", "lenet"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: every contestant on the GPU, DDP over NCCL on every GPU there is (2 or more)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--pairs", type=int, default=100, help="paired epochs per model and process count "
                        "(benchmarks/steps.py); 0 leaves them out")
    parser.add_argument("--compile", action="store_true", help="add dtrain with trainer.compile=true (inductor) "
                        "and its compile time: its first epoch's time less a later epoch's")
    args = parser.parse_args()
    start = time.perf_counter()
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("throughput: --device cuda, but this PyTorch sees no GPU")
    nproc = torch.cuda.device_count() if args.device == "cuda" else 2
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; batch {args.batch}, "
          f"{args.epochs} epochs (first discarded), {args.rounds} rounds, {args.device} {args.precision}\n")
    for model in args.models:
        rows = contestants(model, args.epochs, args.batch, args.device, args.precision, nproc, args.compile)
        rates: dict[str, list[float]] = {name: [] for name, _, _ in rows}
        accuracy: dict[str, float] = {}
        compile_s: list[float] = []
        for r in range(args.rounds):
            for name, _, command in (rows if r % 2 == 0 else rows[::-1]):  # alternate the order too
                result = run_one(command)
                rates[name].append(statistics.mean(result["samples_per_sec"][1:]))
                accuracy[name] = result["val_acc"]
                if name == COMPILED:
                    first, *rest = result["epoch_time_s"]
                    compile_s.append(first - statistics.median(rest))
        print(f"### {model} on the MNIST sample (9,000 train images)\n")
        print("| contestant | processes | samples/s (median) | min–max | vs plain, same processes | val acc |")
        print("|---|---|---|---|---|---|")
        baseline = {procs: statistics.median(rates[name]) for name, procs, _ in rows
                    if name in ("plain loop", "plain DDP script")}
        for name, procs, _ in rows:
            median = statistics.median(rates[name])
            print(f"| {name} | {procs} | {median:,.0f} | {min(rates[name]):,.0f}–{max(rates[name]):,.0f} | "
                  f"{median / baseline[procs]:.2f}× | {accuracy[name]:.3f} |")
        med = {name: statistics.median(v) for name, v in rates.items()}
        lines = [f"dtrain / tutorial loop: {med['dtrain'] / med['tutorial loop']:.1f}×"]
        if "Lightning" in med:
            lines += [f"dtrain / Lightning: {med['dtrain'] / med['Lightning']:.2f}× (1 process)"
                      + (f", {med['dtrain DDP'] / med['Lightning DDP']:.2f}× ({nproc} processes)" if nproc > 1 else "")]
        if compile_s:
            lines.append(f"compiled / eager: {med[COMPILED] / med['dtrain']:.2f}×, compile time "
                         f"{statistics.median(compile_s):.1f} s (first epoch less a later one; "
                         f"{min(compile_s):.1f}–{max(compile_s):.1f})")
        if nproc > 1:
            lines.append(f"dtrain DDP, stop flag every {TrainerConfig.sync_every_n_steps} steps vs every step: "
                         f"{med['dtrain DDP'] / med['dtrain DDP, stop flag synced every step']:.2f}×")
        print("\n" + "; ".join(lines) + "\n")
        if args.pairs:
            print(f"Paired epochs, dtrain / plain loop in the same process(es) ({args.pairs} pairs, "
                  "benchmarks/steps.py):\n")
            print("| processes | median | quartiles | target | met |\n|---|---|---|---|---|")
            for procs in ((1, nproc) if nproc > 1 else (1,)):
                ratios = paired(model, args.batch, args.device, args.precision, procs, args.pairs)["ratios"]
                q = statistics.quantiles(ratios, n=4)
                target = TARGETS[min(procs, 2)]
                median = statistics.median(ratios)
                met = "yes" if median >= target else "no"
                print(f"| {procs} | {median:.3f}× | {q[0]:.3f}–{q[2]:.3f} | ≥ {target}× | {met} |")
            print()
    print(f"total time: {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
