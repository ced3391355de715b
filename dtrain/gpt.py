"""model=gpt: a nanoGPT-style decoder-only transformer. Token and position embeddings, `n_layer` pre-norm
blocks (causal self-attention by `scaled_dot_product_attention`, then a 4x MLP with GELU), a final LayerNorm
and a head over the vocabulary, optionally tied to the token embedding. Its parts are named for the plans
that split it: each `Block` is what FSDP shards and activation checkpointing recomputes; attention's `q`,
`k`, `v` and `proj` and the MLP's `fc` and `proj` are separate Linear layers, so a tensor-parallel plan can
split heads and the hidden width across ranks (attention reads its head count off its local width)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.head_dim, self.dropout = n_embd // n_head, dropout
        self.q, self.k, self.v = (nn.Linear(n_embd, n_embd, bias=bias) for _ in range(3))
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (layer(x).view(B, T, -1, self.head_dim).transpose(1, 2) for layer in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, -1)))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool):
        super().__init__()
        self.fc, self.proj = nn.Linear(n_embd, 4 * n_embd, bias=bias), nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd, bias=bias), nn.LayerNorm(n_embd, bias=bias)
        self.attn, self.mlp = CausalSelfAttention(n_embd, n_head, dropout, bias), MLP(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int = 4, n_head: int = 4, n_embd: int = 128,
                 dropout: float = 0.0, bias: bool = True, tie_weights: bool = True):
        super().__init__()
        self.block_size = block_size
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(Block(n_embd, n_head, dropout, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        if tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def tp_plan(self, tp: int, sequence_parallel: bool = False, loss_parallel: bool = False) -> dict[str, Any]:
        """Its tensor-parallel plan (dist.tp > 1), Megatron's: attention's q/k/v column-wise (each rank a slice of
        the heads) and its output projection row-wise; the MLP's fc column-wise and proj row-wise. With
        `sequence_parallel` (torchtitan's layout) the activations between those pairs are split along the
        sequence: the embeddings hand over slices of it, the norms and dropout work on them, each pair gathers
        them on entry and its row-wise layer reduce-scatters them on exit. With `loss_parallel` the head is split
        over the vocabulary and gives split logits, which the cross-entropy takes as they are. A head tied to
        the token embedding is split alike (both by vocabulary rows)."""
        n_head = self.h[0].attn.q.out_features // self.h[0].attn.head_dim if len(self.h) else tp
        if n_head % tp:
            from dtrain.errors import ConfigError
            raise ConfigError(f"dist.tp={tp}: model.n_head={n_head} heads do not split evenly over {tp} ranks; choose "
                              "a tp that divides the head count")
        plan: dict[str, Any] = {"h.*.attn.q": "colwise", "h.*.attn.k": "colwise", "h.*.attn.v": "colwise",
                                "h.*.attn.proj": "rowwise", "h.*.mlp.fc": "colwise", "h.*.mlp.proj": "rowwise"}
        if not (sequence_parallel or loss_parallel):
            return plan
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                       SequenceParallel)
        stream = Shard(1) if sequence_parallel else Replicate()  # the residual stream between the pairs
        plan.update({"wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=stream),
                     "lm_head": ColwiseParallel(input_layouts=stream,
                                                output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                                use_local_output=not loss_parallel)})
        if sequence_parallel:
            # Gathered once on entry to attention and the MLP, handed on as a DTensor so that the backward
            # sums q's, k's and v's input gradients first and reduce-scatters them once (torchtitan's layout).
            gather = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                        use_local_output=False)
            # Dropout stays out of the plan: on its plain slice it draws from the group's own random stream
            # (a DTensor dropout would draw from PyTorch's tracker, seeded alike on every rank of the world).
            on_slices = SequenceParallel(use_local_output=True)
            plan.update({"wpe": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(0)),
                         "ln_f": on_slices, "h.*.ln_1": on_slices, "h.*.ln_2": on_slices,
                         "h.*.attn": gather, "h.*.mlp": gather,
                         "h.*.attn.proj": RowwiseParallel(output_layouts=Shard(1)),
                         "h.*.mlp.proj": RowwiseParallel(output_layouts=Shard(1))})
        return plan

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids [N, T] (T <= block_size) -> logits [N, T, vocab] for each next token."""
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))
