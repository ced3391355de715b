"""Training augmentations of uint8 image batches [N, C, H, W], by name (`data.augment`).

Each is one of torchvision's transforms computed for a whole batch at once, on whatever device the batch
is, every image drawing its own parameters: `crop` = RandomCrop(size, padding), `flip` =
RandomHorizontalFlip(), `rotate` = RandomRotation(degrees), `scale` = RandomAffine(0, scale=(lo, hi)) (both
nearest-neighbour with a black fill, torchvision's defaults), `jitter` = ColorJitter(brightness, contrast,
saturation) applied in that fixed order (torchvision shuffles the order per image). The tests check each
against torchvision's functional transform with the same parameters. Parameters come from `generator`,
so a seeded stream repeats the same augmentation (a resumed epoch sees the same images).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from dtrain.config import DataConfig


def _uniform(n: int, lo: float, hi: float, generator, device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) * (hi - lo) + lo


class Crop:
    """A random crop of the zero-padded image back to its own size: one gather for the batch."""

    def __init__(self, padding: int):
        self.padding = padding

    def params(self, n: int, generator, device) -> torch.Tensor:
        return torch.randint(0, 2 * self.padding + 1, (2, n), generator=generator, device=device)

    def apply(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        p, dev = self.padding, x.device
        rows = offsets[0, :, None] + torch.arange(h, device=dev)  # [N, H] rows of the padded image
        cols = offsets[1, :, None] + torch.arange(w, device=dev)
        padded = F.pad(x, (p, p, p, p))
        return padded[torch.arange(n, device=dev)[:, None, None, None],
                      torch.arange(c, device=dev)[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]


class Flip:
    """Mirrored left-right, half of the images."""

    def params(self, n: int, generator, device) -> torch.Tensor:
        return torch.rand(n, generator=generator, device=device) < 0.5

    def apply(self, x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        return torch.where(flip[:, None, None, None], x.flip(-1), x)


class Affine:
    """Rotation by a random angle in [-degrees, degrees] and zoom by a random factor in `scale`, about the
    image centre, as torchvision's affine computes it for tensors (its inverse matrix and sampling grid)."""

    def __init__(self, degrees: float = 0.0, scale: Sequence[float] = (1.0, 1.0)):
        self.degrees, self.scale = degrees, tuple(scale)

    def params(self, n: int, generator, device) -> torch.Tensor:
        return torch.stack([_uniform(n, -self.degrees, self.degrees, generator, device),
                            _uniform(n, *self.scale, generator, device)], 1)  # [N, (angle, scale)]

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        angle, scale = params.double().unbind(1)
        rot = -angle * (math.pi / 180)  # counter-clockwise, as torchvision's rotate turns a positive angle
        cos, sin = torch.cos(rot) / scale, torch.sin(rot) / scale
        zero = torch.zeros_like(cos)
        # torchvision's inverse affine matrix (no shear or translation), output -> input pixel offsets
        theta = torch.stack([cos, sin, zero, -sin, cos, zero], 1).view(n, 2, 3).float()
        xs = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=x.device)
        ys = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=x.device)
        base = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w), torch.ones(h, w, device=x.device)], -1)
        grid = base.view(1, h * w, 3).expand(n, -1, -1).bmm(
            theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h], device=x.device))
        out = F.grid_sample(x.float(), grid.view(n, h, w, 2), mode="nearest", padding_mode="zeros",
                            align_corners=False)
        return out.round_().to(x.dtype)


class Jitter:
    """Brightness, contrast and (colour images) saturation, each by a random factor in
    [max(0, 1 - strength), 1 + strength], with torchvision's formulas for uint8 images."""

    def __init__(self, strength: float):
        self.strength = strength

    def params(self, n: int, generator, device) -> torch.Tensor:
        lo, hi = max(0.0, 1 - self.strength), 1 + self.strength
        return torch.stack([_uniform(n, lo, hi, generator, device) for _ in range(3)], 1)

    def apply(self, x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        brightness, contrast, saturation = (f.view(-1, 1, 1, 1) for f in factors.unbind(1))

        def blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
            return (a * ratio + b * (1.0 - ratio)).clamp_(0, 255).to(torch.uint8)

        def gray(a: torch.Tensor) -> torch.Tensor:  # ITU-R 601-2 luma, floored as torchvision does for uint8
            if a.shape[1] == 1:
                return a.float()
            r, g, b = a.unbind(1)
            return (r * 0.2989 + g * 0.587 + b * 0.114).unsqueeze(1).floor_()

        x = (x * brightness).clamp_(0, 255).to(torch.uint8)
        x = blend(x, gray(x).mean(dim=(1, 2, 3), keepdim=True), contrast)
        return blend(x, gray(x), saturation) if x.shape[1] == 3 else x


class Augment:
    """Augmentations applied in order to a uint8 batch; each image draws its own parameters."""

    def __init__(self, ops: Sequence):
        self.ops = list(ops)

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        for op in self.ops:
            x = op.apply(x, op.params(len(x), generator, x.device))
        return x


AUGMENTATIONS: dict[str, Callable[[DataConfig], object]] = {
    "crop": lambda c: Crop(c.crop_padding),
    "flip": lambda c: Flip(),
    "rotate": lambda c: Affine(degrees=c.rotate_degrees),
    "scale": lambda c: Affine(scale=c.scale_range),
    "jitter": lambda c: Jitter(c.jitter),
}
PRESETS = {
    "cifar": ("crop", "flip"),  # the usual CIFAR-10 training augmentation
    "tutorial": ("rotate", "scale", "crop", "flip"),  # the augmentation tutorial's: rotation, scaling, crop, flip
}
NAMES = (*AUGMENTATIONS, *PRESETS)  # what data.augment may list


def build(cfg: DataConfig) -> Optional[Augment]:
    """data.augment as one Augment (presets expanded in place), or None for no augmentation."""
    names = [n for name in cfg.augment for n in PRESETS.get(name, (name,))]
    return Augment([AUGMENTATIONS[n](cfg) for n in names]) if names else None
