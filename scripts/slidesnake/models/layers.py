"""Layers shared by MIL models."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


class MLP(nn.Sequential):
    """Instance projector: (Linear -> ReLU -> Dropout) for each width in ``hidden``."""

    def __init__(self, in_dim: int, hidden: int | Sequence[int], dropout: float = 0.0):
        widths = [hidden] if isinstance(hidden, int) else list(hidden)
        layers: list[nn.Module] = []
        d = in_dim
        for w in widths:
            layers += [nn.Linear(d, w), nn.ReLU(), nn.Dropout(dropout)]
            d = w
        super().__init__(*layers)
        self.out_dim = d


class AttentionPooling(nn.Module):
    """Attention-based pooling (Ilse et al. 2018), gated or not, with ``n_heads`` branches.

    Scores: ``a = w^T tanh(V h)`` or, gated, ``a = w^T (tanh(V h) * sigmoid(U h))``; one ``w`` per
    head (CLAM uses one head per class). ``forward(h)`` returns the pooled bag representation
    ``(n_heads, D)`` and the attention ``(N, n_heads)`` softmax-normalised over the bag;
    ``scores(h)`` gives the raw scores ``(N, n_heads)``.
    """

    def __init__(self, in_dim: int, attn_dim: int = 128, gated: bool = True, dropout: float = 0.0,
                 n_heads: int = 1):
        super().__init__()
        self.gated = gated
        self.n_heads = n_heads
        self.V = nn.Sequential(nn.Linear(in_dim, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.U = nn.Sequential(nn.Linear(in_dim, attn_dim), nn.Sigmoid(), nn.Dropout(dropout)) if gated else None
        self.w = nn.Linear(attn_dim, n_heads)

    def scores(self, h: Tensor) -> Tensor:
        a = self.V(h)
        if self.U is not None:
            a = a * self.U(h)
        return self.w(a)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        attention = torch.softmax(self.scores(h), dim=0)  # (N, K)
        return attention.transpose(0, 1) @ h, attention
