"""The strongest loop a PyTorch user writes by hand: the data preloaded on the device and normalised once
as one contiguous tensor, each batch an `index_select` of it, the fused optimizer (one kernel updates
every parameter: `Adam(fused=True)`), `zero_grad(set_to_none=True)`, and no host sync inside an epoch.
Under torchrun it is the hand-written DDP script: gloo (CPU) or NCCL (CUDA) group, DDP model, each rank a
strided share of one shared permutation, the global batch split over the ranks.

    python benchmarks/plain.py --model mlp3 --epochs 3
    torchrun --standalone --nproc_per_node=2 benchmarks/plain.py --model mlp3 --epochs 3
    python benchmarks/plain.py --device cuda --precision bf16
"""

import argparse
import contextlib
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import mnist_sample, model, report

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="mlp3")
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--batch", type=int, default=64, help="global batch")
parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
args = parser.parse_args()

world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" else None
device = device or torch.device("cpu")
if device.type == "cuda":
    torch.cuda.set_device(device)
if world > 1:
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
torch.manual_seed(0)
train_x, train_y, val_x, val_y = mnist_sample()
scaled = train_x.float().div(255)
mean, std = scaled.mean(), scaled.std()
train_x = ((scaled - mean) / std).contiguous().to(device)
val_x = ((val_x.float().div(255) - mean) / std).to(device)
train_y, val_y = train_y.to(device), val_y.to(device)
net = model(args.model).to(device)
if world > 1:
    net = torch.nn.parallel.DistributedDataParallel(net)
opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)
per_rank = args.batch // world


def autocast():
    if args.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def synchronize():
    if device.type == "cuda":
        torch.cuda.synchronize()


rates = []
for epoch in range(args.epochs):
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(epoch))[rank::world]
    order = order.to(device)
    synchronize()
    start = time.perf_counter()
    for i in range(len(order) // per_rank):
        idx = order[i * per_rank:(i + 1) * per_rank]
        with autocast():
            out = net(train_x.index_select(0, idx))
        loss = F.cross_entropy(out.float(), train_y.index_select(0, idx))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    synchronize()
    rates.append(len(order) // per_rank * per_rank * world / (time.perf_counter() - start))

with torch.no_grad():
    acc = (net(val_x).argmax(1) == val_y).float().mean().item()
if rank == 0:
    report(rates, acc)
if world > 1:
    dist.destroy_process_group()
