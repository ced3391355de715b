"""Synthetic "reviews": token sequences of 4 to 40 tokens from a vocabulary of 64. Tokens 1-8 are positive
words, 9-16 negative ones; the label is 1 when a review holds more positive words than negative ones.
Items are ({"ids": LongTensor[T]}, label): they do not stack, so a collate pads them."""

import torch
from torch.utils.data import Dataset


class Reviews(Dataset):
    vocab_size = 64
    classes = ["negative", "positive"]

    def __init__(self, size: int = 1024, min_len: int = 4, max_len: int = 40, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(size):
            length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
            ids = torch.randint(17, self.vocab_size, (length,), generator=g)  # neutral words
            sentiment = torch.randint(1, 17, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g)
            where = torch.randperm(length, generator=g)[:len(sentiment)]
            ids[where] = sentiment[:len(where)]
            positive, negative = int(((ids >= 1) & (ids <= 8)).sum()), int(((ids >= 9) & (ids <= 16)).sum())
            self.items.append(({"ids": ids}, int(positive > negative)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]
