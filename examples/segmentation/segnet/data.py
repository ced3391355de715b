"""Synthetic images with one square and one disc each on noise, and their masks: 0 background, 1 square,
2 disc; the one-pixel border is -100 (not labelled, as annotators leave edges), which dtrain ignores."""

import torch
from torch.utils.data import Dataset


class Shapes(Dataset):
    task = "segmentation"  # chooses dtrain's task (data.task would too)
    classes = ["background", "square", "disc"]  # names in the per-class IoU report

    def __init__(self, size: int = 512, side: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        self.x = torch.randn(size, 1, side, side, generator=g) * 0.3
        self.y = torch.zeros(size, side, side, dtype=torch.long)
        for i in range(size):
            r, c, half = (torch.randint(3, side - 3, (2,), generator=g).tolist() + [int(torch.randint(1, 3, (1,),
                                                                                         generator=g))])
            square = ((ys - r).abs() <= half) & ((xs - c).abs() <= half)
            r2, c2 = torch.randint(3, side - 3, (2,), generator=g).tolist()
            disc = ((ys - r2) ** 2 + (xs - c2) ** 2 <= 5) & ~square
            self.y[i][square], self.y[i][disc] = 1, 2
            self.x[i, 0][square | disc] += 1.0
        self.y[:, [0, -1], :], self.y[:, :, [0, -1]] = -100, -100

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]
