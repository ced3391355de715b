"""data=text: character-level language modelling on a text file (data.path; empty: the bundled Shakespeare
passages, dtrain/assets/text/NOTICE). Each character is a token (the vocabulary: the characters of the file,
sorted). The text is split by position: the first 1 - data.val_fraction of it trains, the rest validates, so
no validation window overlaps a training one. An item is a window of `block_size` tokens and the same
window shifted by one (the next tokens), every `stride` tokens (0: block_size, each token a target once an
epoch): the `language_modeling` task."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from dtrain import world as w
from dtrain.config import DataConfig
from dtrain.data.core import Splits, Tensors
from dtrain.errors import DataError
from dtrain.validate import fail

BUNDLED = Path(__file__).resolve().parent.parent / "assets" / "text" / "shakespeare.txt"


def text(path: str = "", block_size: int = 64, stride: int = 0, *, options: DataConfig, world: w.World) -> Splits:
    source = Path(path).expanduser() if path else BUNDLED
    try:
        corpus = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"data.path={path}: no such file; give a UTF-8 text file (or leave data.path empty for the "
                        "bundled Shakespeare passages)") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise DataError(f"data.path={path}: not a UTF-8 text file ({type(e).__name__}); give a text file") from None
    vocab = sorted(set(corpus))
    ids = torch.tensor(_codes(corpus, vocab))
    cut = int(len(ids) * (1 - options.val_fraction))
    step = stride or block_size
    train, val = (_windows(part, block_size, step) for part in (ids[:cut], ids[cut:]))
    if len(train[0]) < 1 or len(val[0]) < 1:
        raise DataError(f"data=text: {source} has {len(ids)} characters, too few for windows of data.block_size="
                        f"{block_size} in both splits (data.val_fraction={options.val_fraction}); use a longer text "
                        "or a smaller block_size")
    return Splits(Tensors(*train), Tensors(*val), None, "language_modeling", (block_size,), len(vocab),
                  class_names=vocab, input_dtype="int64",
                  baselines={"val_unigram_perplexity": unigram_perplexity(ids[:cut], val[1], len(vocab))})


def _codes(corpus: str, vocab: list[str]) -> list[int]:
    index = {c: i for i, c in enumerate(vocab)}
    return [index[c] for c in corpus]


def _windows(ids: torch.Tensor, block: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ids[s : s+block] and targets ids[s+1 : s+block+1] for s = 0, step, 2*step, ..."""
    starts = torch.arange(0, max(len(ids) - block, 0), step)
    offsets = starts[:, None] + torch.arange(block)
    return ids[offsets], ids[offsets + 1]


def unigram_perplexity(train: torch.Tensor, targets: torch.Tensor, vocab: int) -> float:
    """The perplexity on `targets` of a model that ignores context: each token's frequency in the training text
    (add-one smoothed). A language model worth training goes well below it."""
    counts = torch.bincount(train, minlength=vocab).double() + 1
    log_p = (counts / counts.sum()).log()
    return math.exp(-float(log_p[targets.flatten()].mean()))


def _check(cfg: DataConfig, path: str = "", block_size: int = 64, stride: int = 0) -> None:
    if block_size < 1:
        fail("data.block_size", block_size, "must be >= 1")
    if stride < 0:
        fail("data.stride", stride, "must be >= 0 (0: data.block_size, windows that do not overlap)")


text.dtrain_task = "language_modeling"
text.dtrain_check = lambda cfg: _check(cfg, **cfg.kwargs)
