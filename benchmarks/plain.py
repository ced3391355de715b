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

def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mlp3")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    return parser.parse_args(argv)


class Loop:
    """The loop's state (data on the device, model, optimizer) and one epoch of it."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.world, self.rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
        cuda = args.device == "cuda"
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():  # benchmarks/steps.py forms it for both loops
            dist.init_process_group("nccl" if cuda else "gloo")
        torch.manual_seed(0)
        train_x, train_y, val_x, val_y = mnist_sample()
        scaled = train_x.float().div(255)
        mean, std = scaled.mean(), scaled.std()
        self.train_x = ((scaled - mean) / std).contiguous().to(self.device)
        self.val_x = ((val_x.float().div(255) - mean) / std).to(self.device)
        self.train_y, self.val_y = train_y.to(self.device), val_y.to(self.device)
        net = model(args.model).to(self.device)
        self.net = torch.nn.parallel.DistributedDataParallel(net) if self.world > 1 else net
        self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-3, fused=True)
        self.per_rank = args.batch // self.world

    def autocast(self):
        if self.args.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def epoch(self, epoch: int) -> float:
        """One epoch; its global samples/s."""
        order = torch.randperm(len(self.train_y), generator=torch.Generator().manual_seed(epoch))
        order = order[self.rank::self.world].to(self.device)
        net, opt, per_rank = self.net, self.opt, self.per_rank
        self.synchronize()
        start = time.perf_counter()
        for i in range(len(order) // per_rank):
            idx = order[i * per_rank:(i + 1) * per_rank]
            with self.autocast():
                out = net(self.train_x.index_select(0, idx))
            loss = F.cross_entropy(out.float(), self.train_y.index_select(0, idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        self.synchronize()
        return len(order) // per_rank * per_rank * self.world / (time.perf_counter() - start)

    def accuracy(self) -> float:
        with torch.no_grad():
            return (self.net(self.val_x).argmax(1) == self.val_y).float().mean().item()


def main() -> None:
    loop = Loop(parse())
    rates = [loop.epoch(epoch) for epoch in range(loop.args.epochs)]
    acc = loop.accuracy()
    if loop.rank == 0:
        report(rates, acc)
    if loop.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
