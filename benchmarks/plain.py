"""The loop a PyTorch user writes by hand: data preloaded and normalised once as one tensor, batches as
index slices, Adam, no framework. Under torchrun it is the hand-written DDP script: gloo/NCCL group, DDP
model, each rank a strided share of one shared permutation, the global batch split over the ranks.

    python benchmarks/plain.py --model mlp3 --epochs 3
    torchrun --standalone --nproc_per_node=2 benchmarks/plain.py --model mlp3 --epochs 3
"""

import argparse
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
args = parser.parse_args()

world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
if world > 1:
    dist.init_process_group("gloo")
torch.manual_seed(0)
train_x, train_y, val_x, val_y = mnist_sample()
mean, std = train_x.float().div(255).mean(), train_x.float().div(255).std()
train_x, val_x = (train_x.float().div(255) - mean) / std, (val_x.float().div(255) - mean) / std
net = model(args.model)
if world > 1:
    net = torch.nn.parallel.DistributedDataParallel(net)
opt = torch.optim.Adam(net.parameters(), lr=1e-3)
per_rank = args.batch // world

rates = []
for epoch in range(args.epochs):
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(epoch))[rank::world]
    start = time.perf_counter()
    for i in range(len(order) // per_rank):
        idx = order[i * per_rank:(i + 1) * per_rank]
        loss = F.cross_entropy(net(train_x[idx]), train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    rates.append(len(order) // per_rank * per_rank * world / (time.perf_counter() - start))

with torch.no_grad():
    acc = (net(val_x).argmax(1) == val_y).float().mean().item()
if rank == 0:
    report(rates, acc)
if world > 1:
    dist.destroy_process_group()
