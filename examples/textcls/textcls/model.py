"""A bag-of-embeddings classifier over the real (unpadded) tokens: dtrain calls it as model(**inputs)."""

from torch import nn


class TextClassifier(nn.Module):
    def __init__(self, vocab_size: int, num_classes: int, dim: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)  # the backbone: its own parameter group
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, num_classes))

    def forward(self, ids, mask):
        tokens = self.embed(ids) * mask[..., None]
        return self.head(tokens.sum(1) / mask.sum(1, keepdim=True))
