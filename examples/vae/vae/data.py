"""Synthetic images of one soft blob each: items are images alone (no target); the VAE's steps need none."""

import torch
from torch.utils.data import Dataset


class Blobs(Dataset):
    def __init__(self, size: int = 2048, side: int = 12, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        centre = torch.rand(size, 2, generator=g) * (side - 4) + 2
        width = torch.rand(size, 1, 1, generator=g) * 1.5 + 1.0
        grid = torch.arange(side, dtype=torch.float32)
        dy = (grid[None, :, None] - centre[:, 0, None, None]) ** 2
        dx = (grid[None, None, :] - centre[:, 1, None, None]) ** 2
        self.x = torch.exp(-(dy + dx) / (2 * width ** 2))[:, None]  # [size, 1, side, side], in 0..1

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i]
