"""DA-MIL: divide-and-aggregate MIL with label-related and negative-only sub-bag tokens.

1. Instances are embedded (``Linear + ReLU + Dropout`` to ``hidden``) and divided into sub-bags of
   ``sub_bag_size`` (``m``) tiles: a random partition while training (a ``torch.Generator`` owned
   by the model, seeded from the training seed), the tiles in their stored order at evaluation; the
   last sub-bag holds the remainder.
2. Per sub-bag two class-token blocks read ``[cls; tiles]``: ``z~ = cls + MHSA(LN([cls; tiles]))_cls``,
   ``z = MLP(LN(z~)) + z~``; the label block gives the label-related token ``z_L``, the negative
   block the negative-only token ``z_N``.
3. Gated attention over the sub-bags' ``z_L`` gives the slide representation ``z_W``.
4. Heads: slide classifier on ``z_W``; sub-bag classifier on each ``z_L`` (target: the slide label);
   on each ``z_N`` (negative slides only, target: the negative class) the same sub-bag classifier
   (``neg_head="shared"``, default) or a separate one (``"separate"``).
5. Loss: ``ce_slide + lambda_sub * ce_sub + lambda_neg * ce_neg + lambda_con * contrastive`` with the
   adaptive contrastive term of :func:`adaptive_contrastive_loss`.

The **negative class is the first class** (index 0 of ``classes``); every other class counts as
positive for ``ce_neg`` and the contrastive term.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slidesnake.models import register_model
from slidesnake.models.base import MILModel, MILOutput, weighted_cross_entropy
from slidesnake.models.layers import MLP, AttentionPooling

NEGATIVE_CLASS = 0


def adaptive_contrastive_loss(z_l: Tensor, z_n: Tensor, negative: bool, delta: float = 1.0) -> Tensor:
    """Mean over sub-bags of the adaptive contrastive term between ``z_L`` and ``z_N`` ``(B, d)``.

    With ``d = ||z_L - z_N||_2``: negative slide ``d^2`` (pull together); positive slide
    ``max(0, delta - d)^2`` (push apart until the margin ``delta``).
    """
    diff = z_l - z_n
    if negative:
        return diff.pow(2).sum(dim=-1).mean()
    d = torch.linalg.vector_norm(diff, dim=-1)
    return F.relu(delta - d).pow(2).mean()


class ClassTokenBlock(nn.Module):
    """One pre-LayerNorm transformer block whose only output is its learnable class token.

    ``forward(x (B, m, d), pad (B, m) bool)`` -> ``z (B, d)`` and the class token's attention to
    the tiles ``(B, m)`` (heads averaged; padding 0).
    """

    def __init__(self, dim: int, heads: int = 4, mlp_ratio: float = 2.0, dropout: float = 0.0):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        width = max(1, int(round(dim * mlp_ratio)))
        self.mlp = nn.Sequential(nn.Linear(dim, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor, pad: Tensor) -> tuple[Tensor, Tensor]:
        b = x.shape[0]
        cls = self.cls_token.expand(b, -1, -1).to(x.dtype)
        seq = self.norm1(torch.cat([cls, x], dim=1))
        mask = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=x.device), pad], dim=1)
        out, weights = self.attn(seq[:, :1], seq, seq, key_padding_mask=mask, need_weights=True,
                                 average_attn_weights=True)
        z = cls + out  # z~
        z = z + self.mlp(self.norm2(z))
        return z[:, 0], weights[:, 0, 1:]


@register_model("da_mil")
class DAMIL(MILModel):
    """Divide-and-aggregate MIL (see the module docstring).

    ``attention`` output: sub-bag attention times the label block's class-token attention to the
    tile within its sub-bag, normalised over the bag. ``extras``: ``z_l``, ``z_n``, ``sub_logits``,
    ``neg_logits``, ``sub_attention`` ``(B,)``, ``sub_bags`` (index tensor ``(B, m)``, -1 = padding).
    """

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 256, sub_bag_size: int = 16, heads: int = 4,
                 mlp_ratio: float = 2.0, attn_dim: int | None = None, dropout: float = 0.25,
                 attention_dropout: float = 0.0, delta: float = 1.0, lambda_sub: float = 1.0,
                 lambda_neg: float = 1.0, lambda_con: float = 1.0, neg_head: str = "shared",
                 seed: int | None = None):
        super().__init__(in_dim, n_classes)
        if sub_bag_size < 1:
            raise ValueError(f"da_mil: sub_bag_size must be >= 1; got {sub_bag_size}")
        if hidden % heads:
            raise ValueError(f"da_mil: hidden ({hidden}) must be a multiple of heads ({heads})")
        if neg_head not in ("shared", "separate"):
            raise ValueError(f"da_mil: neg_head must be 'shared' or 'separate'; got {neg_head!r}")
        self.sub_bag_size = int(sub_bag_size)
        self.delta = float(delta)
        self.lambda_sub, self.lambda_neg, self.lambda_con = float(lambda_sub), float(lambda_neg), float(lambda_con)
        self.projector = MLP(in_dim, hidden, dropout)
        self.label_block = ClassTokenBlock(hidden, heads, mlp_ratio, attention_dropout)
        self.negative_block = ClassTokenBlock(hidden, heads, mlp_ratio, attention_dropout)
        self.pooling = AttentionPooling(hidden, attn_dim or max(1, hidden // 2), gated=True, dropout=attention_dropout)
        self.classifier = nn.Linear(hidden, n_classes)
        self.sub_classifier = nn.Linear(hidden, n_classes)
        self.neg_classifier = None if neg_head == "shared" else nn.Linear(hidden, n_classes)
        self.generator = torch.Generator()
        # Without an explicit seed, draw one from the global RNG, which train_fold seeds with the
        # training seed just before building the model: runs are reproducible per training seed.
        self.reseed(int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed))

    def reseed(self, seed: int) -> None:
        """Reset the generator of the random sub-bag partition."""
        self.generator.manual_seed(int(seed))

    @classmethod
    def search_space(cls, trial) -> dict:
        return {
            "sub_bag_size": trial.suggest_categorical("sub_bag_size", [8, 16, 32, 64]),
            "delta": trial.suggest_float("delta", 0.25, 4.0, log=True),
            "lambda_con": trial.suggest_float("lambda_con", 0.1, 2.0, log=True),
        }

    def partition(self, n: int, device: torch.device) -> Tensor:
        """Sub-bags as an index tensor ``(B, m)``, ``-1`` padding the last one."""
        m = self.sub_bag_size
        order = torch.randperm(n, generator=self.generator) if self.training else torch.arange(n)
        n_sub = math.ceil(n / m)
        idx = torch.cat([order, order.new_full((n_sub * m - n,), -1)]).view(n_sub, m)
        # One sub-bag: trim the padding so that the attention runs over the tiles only.
        if n_sub == 1:
            idx = idx[:, :n]
        return idx.to(device)

    def forward(self, bag: Tensor) -> MILOutput:
        self.check_bag(bag)
        n = bag.shape[0]
        h = self.projector(bag)
        idx = self.partition(n, bag.device)
        pad = idx < 0
        x = h[idx.clamp_min(0)]  # (B, m, hidden)
        z_l, w_l = self.label_block(x, pad)
        z_n, _ = self.negative_block(x, pad)
        z_w, a = self.pooling(z_l)  # (1, hidden), (B, 1)
        logits = self.classifier(z_w)[0]

        within = w_l / w_l.sum(dim=1, keepdim=True).clamp_min(torch.finfo(w_l.dtype).tiny)
        per_tile = (a * within)[~pad]
        attention = torch.zeros(n, dtype=per_tile.dtype, device=bag.device).index_add(0, idx[~pad], per_tile)
        attention = attention / attention.sum()
        return MILOutput(logits=logits, attention=attention, extras={
            "z_l": z_l, "z_n": z_n, "z_w": z_w[0], "sub_logits": self.sub_classifier(z_l),
            "neg_logits": (self.sub_classifier if self.neg_classifier is None else self.neg_classifier)(z_n),
            "sub_attention": a[:, 0], "sub_bags": idx,
        })

    def single_instance_logits(self, instances: Tensor) -> Tensor:
        # a bag of one: one sub-bag of one tile, whose label token the sub-bag attention (1) passes on
        self.check_bag(instances)
        x = self.projector(instances)[:, None]  # (N, 1, hidden): N sub-bags of one tile each
        z_l, _ = self.label_block(x, torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device))
        return self.classifier(z_l)

    def loss(self, output: MILOutput, label: Tensor, class_weights: Tensor | None = None) -> dict[str, Tensor]:
        """``ce_slide``, ``ce_sub``, ``ce_neg``, ``contrastive`` and their weighted sum ``total``.

        Class weights scale each cross-entropy term by the weight of that term's target.
        """
        y = int(label)
        ex = output.extras
        n_sub = ex["z_l"].shape[0]
        w = 1.0 if class_weights is None else class_weights.to(output.logits.dtype)
        ce_slide = weighted_cross_entropy(output.logits, label, class_weights)
        target = torch.full((n_sub,), y, dtype=torch.long, device=output.logits.device)
        ce_sub = F.cross_entropy(ex["sub_logits"], target) * (1.0 if class_weights is None else w[y])
        negative = y == NEGATIVE_CLASS
        if negative:
            ce_neg = F.cross_entropy(ex["neg_logits"], torch.full_like(target, NEGATIVE_CLASS))
            ce_neg = ce_neg * (1.0 if class_weights is None else w[NEGATIVE_CLASS])
        else:
            ce_neg = output.logits.new_zeros(())
        con = adaptive_contrastive_loss(ex["z_l"], ex["z_n"], negative, self.delta)
        total = ce_slide + self.lambda_sub * ce_sub + self.lambda_neg * ce_neg + self.lambda_con * con
        return {"ce_slide": ce_slide, "ce_sub": ce_sub, "ce_neg": ce_neg, "contrastive": con, "total": total}
