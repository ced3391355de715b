"""The classic tutorial loop: a torchvision data set read as PIL images, ToTensor + Normalize per sample,
a DataLoader collating batches, Adam. The images are the bundled MNIST sample (torchvision's MNIST reads
its t10k files from a temporary MNIST/raw/ folder), split 9,000 / 1,000 as dtrain splits it.

    python benchmarks/tutorial.py --model mlp3 --epochs 3 [--device cuda]
"""

import argparse
import gzip
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from common import SAMPLE, model, report

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="mlp3")
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--batch", type=int, default=64)
parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
args = parser.parse_args()

torch.manual_seed(0)
root = Path(tempfile.mkdtemp())
(root / "MNIST" / "raw").mkdir(parents=True)
for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
    (root / "MNIST" / "raw" / name).write_bytes(gzip.open(SAMPLE / f"{name}.gz").read())
for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):  # torchvision checks all four exist
    (root / "MNIST" / "raw" / name).touch()
transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
full = datasets.MNIST(str(root), train=False, transform=transform)
perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(0)).tolist()
train, val = Subset(full, perm[1000:]), Subset(full, perm[:1000])
train_loader = DataLoader(train, batch_size=args.batch, shuffle=True, drop_last=True)
net = model(args.model).to(args.device)
opt = torch.optim.Adam(net.parameters(), lr=1e-3)

rates = []
for epoch in range(args.epochs):
    start, seen = time.perf_counter(), 0
    for x, y in train_loader:
        x, y = x.to(args.device), y.to(args.device)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(y)
    if args.device == "cuda":
        torch.cuda.synchronize()
    rates.append(seen / (time.perf_counter() - start))

correct = 0
with torch.no_grad():
    for x, y in DataLoader(val, batch_size=1000):
        correct += (net(x.to(args.device)).argmax(1).cpu() == y).sum().item()
report(rates, correct / len(val))
