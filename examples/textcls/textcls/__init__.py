"""Text classification as research code first writes it: items of different lengths with a dict as input,
a padding collate of its own, a model called as forward(ids, mask), and a smaller learning rate for the
embedding (the "backbone") than for the classifier head."""
