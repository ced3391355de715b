"""The streaming path: `data=imagefolder` (image files decoded and resized by DataLoader workers) against
the loop a user writes by hand on the same folder (`DataLoader(ImageFolder(...), num_workers=N,
pin_memory=on CUDA, persistent_workers=True)`, torchvision v2 transforms, fused Adam), interleaved; and,
first, the decode itself: PIL (what ImageFolder uses) against `torchvision.io.decode_image`.

    python benchmarks/streaming.py [--images 6000] [--format png] [--workers 2] [--epochs 3] [--rounds 3]
                                   [--device cpu|cuda]

The folder is made from the bundled MNIST sample: RGB images of 48x48 pixels (resized to dtrain's
default 32x32 while training), train/<digit>/ and a val/ of 500, so neither contestant carves a split.
Samples/s per run: the mean over its epochs after the first; the table: median over rounds, min-max.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable
SIZE = 48


def make_folder(root: Path, images: int, fmt: str) -> None:
    from PIL import Image

    from common import mnist_sample
    train_x, train_y, val_x, val_y = mnist_sample()
    for split, xs, ys, n in (("train", train_x, train_y, images), ("val", val_x, val_y, 500)):
        for i, (x, y) in enumerate(zip(xs[:n], ys[:n].tolist())):
            folder = root / split / str(y)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[0].numpy()).convert("RGB").resize((SIZE, SIZE)).save(folder / f"{i}.{fmt}")


def decode_rates(root: Path, rounds: int) -> dict[str, float]:
    """Images/s of each decoder over every training file (one process, as one worker decodes)."""
    import torch
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_image, read_file
    from torchvision.transforms.v2 import functional as F

    def pil(path: Path) -> torch.Tensor:
        with open(path, "rb") as f:
            return F.pil_to_tensor(Image.open(f).convert("RGB"))

    def tv(path: Path) -> torch.Tensor:
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)

    files = sorted((root / "train").rglob("*.*"))
    assert torch.equal(pil(files[0]), tv(files[0]))  # the same pixels either way
    rates: dict[str, list[float]] = {"PIL": [], "torchvision.io.decode_image": []}
    for _ in range(rounds):
        for name, decode in (("PIL", pil), ("torchvision.io.decode_image", tv)):
            start = time.perf_counter()
            for path in files:
                decode(path)
            rates[name].append(len(files) / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def plain(args) -> None:
    """The hand-written loop (one contestant, in its own process)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    from common import report
    from dtrain import models
    torch.manual_seed(0)
    device = torch.device(args.device)
    tf = v2.Compose([v2.ToImage(), v2.Resize((32, 32)), v2.ToDtype(torch.float32, scale=True),
                     v2.Normalize([0.5] * 3, [0.5] * 3)])
    train = ImageFolder(str(Path(args.plain) / "train"), transform=tf)
    loader = DataLoader(train, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=args.workers,
                        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    net = models.build(models.builtin("lenet"), "classification", (3, 32, 32), 10, "imagefolder").to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)
    rates = []
    for _ in range(args.epochs):
        start, seen = time.perf_counter(), 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(seen / (time.perf_counter() - start))
    report(rates, float("nan"))


def run(command: list[str], tmp: Path) -> list[float]:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(HERE)}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=HERE.parent, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    if "dtrain" in command:
        return [json.loads(line)["samples_per_sec"] for line in (tmp / "run" / "metrics.jsonl").open()]
    [line] = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))["samples_per_sec"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--format", default="png", choices=["png", "jpg"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--plain", help=argparse.SUPPRESS)  # internal: run the plain loop on this folder
    args = parser.parse_args()
    if args.plain:
        return plain(args)
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp, "images")
        make_folder(root, args.images, args.format)
        print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, {args.device}; {args.images} {args.format} "
              f"images of {SIZE}x{SIZE} -> 32x32, lenet, batch {args.batch}, {args.workers} workers, "
              f"{args.epochs} epochs (first discarded), {args.rounds} rounds\n")
        decoded = decode_rates(root, args.rounds)
        print("| decoder (one process) | images/s |\n|---|---|")
        for name, rate in decoded.items():
            print(f"| {name} | {rate:,.0f} |")
        common = ["--epochs", str(args.epochs), "--batch", str(args.batch), "--workers", str(args.workers),
                  "--device", args.device]
        rows = {"plain DataLoader(ImageFolder) loop": [PY, str(HERE / "streaming.py"), "--plain", str(root),
                                                       *common],
                "dtrain data=imagefolder": [PY, "-m", "dtrain", "data=imagefolder", f"data.root={root}",
                                            "model=lenet", f"data.num_workers={args.workers}",
                                            f"data.batch_size={args.batch}", f"trainer.epochs={args.epochs}",
                                            f"trainer.device={args.device}", "checkpoint.enabled=false",
                                            "logger.plots=false", f"hydra.run.dir={tmp}/run"]}
        rates: dict[str, list[float]] = {name: [] for name in rows}
        for r in range(args.rounds):
            for name, command in (list(rows.items()) if r % 2 == 0 else list(rows.items())[::-1]):
                subprocess.run(["rm", "-rf", f"{tmp}/run"], check=True)
                rates[name].append(statistics.mean(run(command, Path(tmp))[1:]))
        base = statistics.median(rates["plain DataLoader(ImageFolder) loop"])
        print("\n| contestant | samples/s (median) | min–max | vs plain |\n|---|---|---|---|")
        for name, r in rates.items():
            print(f"| {name} | {statistics.median(r):,.0f} | {min(r):,.0f}–{max(r):,.0f} | "
                  f"{statistics.median(r) / base:.2f}× |")


if __name__ == "__main__":
    main()
