"""The VAE: its loss needs its own internals (the posterior's mean and variance), so it has its own steps."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class VAE(nn.Module):
    def __init__(self, input_shape, latent: int = 4, hidden: int = 64, beta: float = 1.0):
        super().__init__()
        self.shape, self.beta = tuple(input_shape), beta
        size = math.prod(input_shape)
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(size, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, size))

    def forward(self, x):  # the reconstruction of the posterior's mean: what export and predict use
        mean, _ = self.encoder(x).chunk(2, dim=1)
        return self.decoder(mean).view(-1, *self.shape)

    def training_step(self, x):
        mean, log_var = self.encoder(x).chunk(2, dim=1)
        z = mean + torch.randn_like(mean) * (0.5 * log_var).exp()  # dtrain saves and restores this noise's RNG
        error = (self.decoder(z).view_as(x) - x).pow(2).flatten(1).sum(1).mean()  # an image's squared error
        kl = -0.5 * (1 + log_var - mean.pow(2) - log_var.exp()).sum(1).mean()
        recon = error / x[0].numel()  # per pixel, as validation reports it
        return {"loss": error + self.beta * kl, "recon": recon, "kl": kl}  # train_loss, train_recon, train_kl

    def validation_step(self, x):
        mean, log_var = self.encoder(x).chunk(2, dim=1)
        kl = -0.5 * (1 + log_var - mean.pow(2) - log_var.exp()).sum(1).mean()
        return {"recon": F.mse_loss(self(x), x), "kl": kl}  # val_recon, val_kl: batch means
