"""TransMIL: transformer-based correlated MIL (Shao et al., NeurIPS 2021).

As the authors' ``models/TransMIL.py``: ``Linear(in_dim, 512) + ReLU``; the sequence is squared to a
``ceil(sqrt(N))`` x ``ceil(sqrt(N))`` grid by appending copies of its first instances; a class
token is prepended; ``TransLayer`` (pre-LayerNorm Nyström attention with residual) -> PPEG
(depth-wise 7/5/3 convolutions on the grid plus identity) -> ``TransLayer`` -> LayerNorm -> linear
classifier on the class token.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from slidesnake.models import register_model
from slidesnake.models.base import MILModel, MILOutput
from slidesnake.models.layers import MLP
from slidesnake.models.nystrom import NystromAttention


class TransLayer(nn.Module):
    """``x + NystromAttention(LayerNorm(x))`` (TransMIL's TransLayer)."""

    def __init__(self, dim: int, heads: int = 8, num_landmarks: int | None = None, pinv_iterations: int = 6,
                 dropout: float = 0.1, residual_conv_kernel: int = 33):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim=dim, dim_head=dim // heads, heads=heads,
                                     num_landmarks=num_landmarks or dim // 2, pinv_iterations=pinv_iterations,
                                     residual=True, residual_conv_kernel=residual_conv_kernel, dropout=dropout)

    def forward(self, x: Tensor, attn_of: int | None = None, exact: bool = False) -> tuple[Tensor, Tensor | None]:
        out, row = self.attn(self.norm(x), attn_of=attn_of, exact=exact)
        return x + out, row


class PPEG(nn.Module):
    """Pyramid position encoding generator: identity + depth-wise 7x7, 5x5 and 3x3 convolutions."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, 1, 7 // 2, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 5 // 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 3 // 2, groups=dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        b, _, c = x.shape
        cls_token, feat = x[:, :1], x[:, 1:]
        grid = feat.transpose(1, 2).reshape(b, c, height, width)
        grid = self.proj(grid) + grid + self.proj1(grid) + self.proj2(grid)
        return torch.cat([cls_token, grid.flatten(2).transpose(1, 2)], dim=1)


@register_model("transmil")
class TransMIL(MILModel):
    """TransMIL. ``attention`` output: the class token's attention to each instance in the last layer.

    That row is averaged over heads; a tile's copies appended by the squaring are summed back into
    it; ``attention_mode="nystrom"`` (default) takes the Nyström-approximated row the layer actually
    uses, clipped at 0, ``"exact"`` the exact softmax row; either is normalised over the bag.

    Patch predictions (``single_instance_logits``): every tile as a bag of one, in one batch. Each
    such bag is still padded to ``num_landmarks`` tokens by the Nyström layers, so a tile costs about
    what a bag of ``num_landmarks`` tiles does.
    """

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 512, heads: int = 8,
                 num_landmarks: int | None = None, pinv_iterations: int = 6, dropout: float = 0.1,
                 residual_conv_kernel: int = 33, attention_mode: str = "nystrom"):
        super().__init__(in_dim, n_classes)
        if hidden % heads:
            raise ValueError(f"transmil: hidden ({hidden}) must be a multiple of heads ({heads})")
        if attention_mode not in ("nystrom", "exact"):
            raise ValueError(f"transmil: attention_mode must be 'nystrom' or 'exact'; got {attention_mode!r}")
        self.attention_mode = attention_mode
        self.fc1 = MLP(in_dim, hidden)  # Linear + ReLU (dropout 0, as the original _fc1)
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden))
        kw = dict(heads=heads, num_landmarks=num_landmarks, pinv_iterations=pinv_iterations, dropout=dropout,
                  residual_conv_kernel=residual_conv_kernel)
        self.layer1 = TransLayer(hidden, **kw)
        self.pos_layer = PPEG(hidden)
        self.layer2 = TransLayer(hidden, **kw)
        self.norm = nn.LayerNorm(hidden)
        self.classifier = nn.Linear(hidden, n_classes)

    @classmethod
    def search_space(cls, trial) -> dict:
        return {"hidden": trial.suggest_categorical("hidden", [128, 256, 512])}

    def forward(self, bag: Tensor) -> MILOutput:
        self.check_bag(bag)
        n = bag.shape[0]
        h = self.fc1(bag)[None]  # (1, N, hidden)
        side = math.ceil(math.sqrt(n))
        source = torch.arange(side * side, device=bag.device) % n  # position -> tile it copies
        h = h[:, source]  # squaring: append copies of the first instances
        h = torch.cat([self.cls_token.to(h.dtype), h], dim=1)
        h, _ = self.layer1(h)
        h = self.pos_layer(h, side, side)
        h, row = self.layer2(h, attn_of=0, exact=self.attention_mode == "exact")
        cls = self.norm(h)[:, 0]
        logits = self.classifier(cls)[0]

        per_position = row[0].mean(dim=0)[1:]  # heads averaged; drop the class token's own weight
        if self.attention_mode == "nystrom":
            per_position = per_position.clamp_min(0)
        attention = torch.zeros(n, dtype=per_position.dtype, device=bag.device).index_add(0, source, per_position)
        total = attention.sum()
        attention = attention / total if total > 0 else torch.full_like(attention, 1.0 / n)
        return MILOutput(logits=logits, attention=attention, extras={"embedding": cls[0]})

    def single_instance_logits(self, instances: Tensor, batch: int = 32) -> Tensor:
        # bags of one tile, ``batch`` at a time (each holds heads x landmarks^2 attention matrices):
        # a 1 x 1 grid (no squaring copies) after the class token, both layers, the class token's logits
        self.check_bag(instances)
        out = []
        for start in range(0, instances.shape[0], batch):
            h = self.fc1(instances[start:start + batch])[:, None]  # (B, 1, hidden)
            h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1).to(h.dtype), h], dim=1)
            h, _ = self.layer1(h)
            h = self.pos_layer(h, 1, 1)
            h, _ = self.layer2(h)
            out.append(self.classifier(self.norm(h)[:, 0]))
        return torch.cat(out)
