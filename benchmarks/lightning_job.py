"""The same job in PyTorch Lightning, written as its documentation shows: a LightningModule, DataLoaders
over a preloaded normalised TensorDataset, Trainer(accelerator="cpu"|"gpu", devices=N) (DDP for N > 1,
Lightning's own launcher and DistributedSampler; the global batch split over the devices).

    python benchmarks/lightning_job.py --model mlp3 --epochs 3 --devices 2
"""

import argparse
import os
import time
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from common import mnist_sample, model, report

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="mlp3")
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--batch", type=int, default=64, help="global batch")
parser.add_argument("--devices", type=int, default=1)
parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
args = parser.parse_args()
warnings.filterwarnings("ignore")
os.environ.setdefault("PL_DISABLE_FORK", "1")


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = model(args.model)

    def training_step(self, batch, i):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class EpochTimer(L.Callback):
    def __init__(self):
        self.rates = []

    def on_train_epoch_start(self, trainer, module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        if args.device == "cuda":
            torch.cuda.synchronize()
        batches = trainer.num_training_batches
        self.rates.append(batches * args.batch / (time.perf_counter() - self.start))


L.seed_everything(0, verbose=False)
train_x, train_y, val_x, val_y = mnist_sample()
mean, std = train_x.float().div(255).mean(), train_x.float().div(255).std()
train_x, val_x = (train_x.float().div(255) - mean) / std, (val_x.float().div(255) - mean) / std
loader = DataLoader(TensorDataset(train_x, train_y), batch_size=args.batch // args.devices, shuffle=True,
                    drop_last=True)
timer, module = EpochTimer(), Module()
trainer = L.Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=args.devices,
                    precision="bf16-mixed" if args.precision == "bf16" else "32-true", max_epochs=args.epochs,
                    callbacks=[timer], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, strategy="ddp" if args.devices > 1 else "auto")
trainer.fit(module, loader)
if trainer.global_rank == 0:
    with torch.no_grad():
        net = module.net.to(args.device)
        acc = (net(val_x.to(args.device)).argmax(1).cpu() == val_y).float().mean().item()
    report(timer.rates, acc)
