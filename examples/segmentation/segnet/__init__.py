"""Semantic segmentation: a small U-Net-like net on synthetic images of squares and discs, trained with
dtrain's segmentation task (a class per pixel, pixel accuracy, mean IoU, -100 ignored)."""
