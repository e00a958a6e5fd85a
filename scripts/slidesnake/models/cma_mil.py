"""CMA-MIL: cross-magnification attention MIL over one slide tiled at several magnifications.

Reads a :class:`~slidesnake.bags.MultiscaleBag` (``bag_type = "multiscale"``): features at every
magnification ``m_1 < ... < m_S`` and, for each (finer, coarser) pair, the row of the coarser tile
that contains each finer tile (``-1`` when it was filtered out as background).

1. **Projector per magnification**: ``Linear(in_dim, hidden) + ReLU + Dropout``, one per scale.
2. **Cross-magnification attention**: every tile's embedding ``h`` is the query of a multi-head
   attention over the embeddings of its *aligned* tiles, one token per scale: itself, its parent at
   each coarser scale, and the mean of its children at each finer scale. A learnt scale embedding is
   added to the query and to every token; missing tokens (no parent kept, no child kept) are masked,
   so such a tile attends only to what exists (at least itself). Pre-norm residual (as transformer
   MIL blocks): ``z = h + MHA(LN(h + e_s), LN(tokens + e))``. The per-tile weights over the scales
   are returned.
3. **Gated attention pooling per scale** (Ilse et al. 2018) over the ``z`` of that scale.
4. **Fusion** of the ``S`` scale representations: ``"attention"`` (default) -- gated attention over
   the scales, whose weights are returned; or ``"concat"`` -- ``Linear(S * hidden, hidden) + ReLU +
   Dropout`` on the concatenation.
5. **Bag classifier** ``Linear(hidden, n_classes)``.
6. **Instance loss** on the finest scale as CLAM (Lu et al. 2021), reusing
   :func:`slidesnake.models.clam.instance_eval`: one ``Linear(hidden, 2)`` instance classifier per
   class; the ``k_sample`` most attended finest tiles of the label's branch are pseudo-labelled
   positive and the ``k_sample`` least attended negative (with ``subtyping`` the other classes'
   top-k are negatives); smooth top-1 SVM (default) or cross-entropy;
   ``total = bag_weight * ce + (1 - bag_weight) * instance``. ``k = min(k_sample, N_finest // 2)``.

Outputs: ``attention`` is the finest scale's; ``extras["attention"]`` maps every magnification to its
attention ``(N_m,)``; ``extras["cross_attention"][m]`` ``(N_m, S)`` each tile's weights over the
scales (ascending magnification; 0 for masked tokens); ``extras["scale_weights"]`` ``(S,)`` (attention
fusion only).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from slidesnake.bags import MultiscaleBag
from slidesnake.models import register_model
from slidesnake.models.base import MILModel, MILOutput, weighted_cross_entropy
from slidesnake.models.clam import INSTANCE_LOSSES, InstanceClustering
from slidesnake.models.layers import MLP, AttentionPooling

FUSIONS = ("attention", "concat")


class CrossScaleAttention(nn.Module):
    """One query per tile over its ``S`` aligned tokens (one per scale), masked where missing;
    pre-norm residual ``z = h + MHA(LN(h + e_s), LN(tokens + e))`` with learnt scale embeddings ``e``.

    ``forward(h (N, d), tokens (N, S, d), present (N, S) bool, scale)`` -> ``z (N, d)`` and the
    attention over the tokens ``(N, S)`` (heads averaged).
    """

    def __init__(self, dim: int, n_scales: int, heads: int = 4, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"cma_mil: hidden ({dim}) must be divisible by heads ({heads})")
        self.scale_embedding = nn.Parameter(torch.zeros(n_scales, dim))
        nn.init.trunc_normal_(self.scale_embedding, std=0.02)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, h: Tensor, tokens: Tensor, present: Tensor, scale: int) -> tuple[Tensor, Tensor]:
        q = self.norm(h + self.scale_embedding[scale]).unsqueeze(1)        # (N, 1, d)
        kv = self.norm(tokens + self.scale_embedding.unsqueeze(0))         # (N, S, d)
        out, w = self.attn(q, kv, kv, key_padding_mask=~present, need_weights=True, average_attn_weights=True)
        return h + self.dropout(out[:, 0]), w[:, 0]


def aligned_tokens(h: Sequence[Tensor], parents: dict[tuple[int, int], Tensor], s: int) -> tuple[Tensor, Tensor]:
    """Tokens ``(N_s, S, d)`` of scale ``s``'s tiles: token ``t`` is the tile itself (``t == s``), its
    parent at a coarser ``t`` or the mean of its children at a finer ``t``; and which exist ``(N_s, S)``.

    ``parents[(fine, coarse)]`` (scale indices, ascending magnification) holds the coarse row of every
    fine tile, -1 when missing.
    """
    n, d = h[s].shape
    toks, present = [], []
    for t in range(len(h)):
        if t == s:
            toks.append(h[s])
            present.append(torch.ones(n, dtype=torch.bool, device=h[s].device))
        elif t < s:  # coarser: the parent
            p = parents[(s, t)]
            ok = p >= 0
            toks.append(h[t][p.clamp(min=0)] * ok[:, None].to(h[t].dtype))
            present.append(ok)
        else:  # finer: the mean of the children
            p = parents[(t, s)]
            ok = p >= 0
            idx = p[ok]
            sums = h[s].new_zeros(n, d).index_add(0, idx, h[t][ok])
            counts = torch.bincount(idx, minlength=n)
            toks.append(sums / counts.clamp(min=1)[:, None].to(sums.dtype))
            present.append(counts > 0)
    return torch.stack(toks, dim=1), torch.stack(present, dim=1)


@register_model("cma_mil")
class CMAMIL(InstanceClustering, MILModel):
    """Cross-magnification attention MIL (see the module docstring)."""

    bag_type = "multiscale"

    def __init__(self, in_dim: int, n_classes: int, magnifications: Sequence[float] = (5.0, 10.0, 20.0),
                 hidden: int = 256, attn_dim: int | None = None, heads: int = 4, gated: bool = True,
                 dropout: float = 0.25, attention_dropout: float = 0.0, fusion: str = "attention",
                 k_sample: int = 8, bag_weight: float = 0.7, inst_loss: str = "svm", subtyping: bool = False):
        super().__init__(in_dim, n_classes)
        mags = sorted(float(m) for m in magnifications)
        if len(mags) < 2 or len(set(mags)) != len(mags):
            raise ValueError(f"cma_mil needs at least two distinct magnifications; got {list(magnifications)}")
        if fusion not in FUSIONS:
            raise ValueError(f"cma_mil: fusion must be one of {FUSIONS}; got {fusion!r}")
        if inst_loss not in INSTANCE_LOSSES:
            raise ValueError(f"cma_mil: inst_loss must be one of {INSTANCE_LOSSES}; got {inst_loss!r}")
        if not 0.0 <= bag_weight <= 1.0:
            raise ValueError(f"cma_mil: bag_weight must be in [0, 1]; got {bag_weight}")
        if k_sample < 1:
            raise ValueError(f"cma_mil: k_sample must be >= 1; got {k_sample}")
        self.magnifications = mags
        self.fusion_mode = fusion
        self.k_sample, self.bag_weight = int(k_sample), float(bag_weight)
        self.inst_loss, self.subtyping = inst_loss, bool(subtyping)
        n = len(mags)
        attn_dim = attn_dim or max(1, hidden // 2)
        self.projectors = nn.ModuleList([MLP(in_dim, hidden, dropout) for _ in mags])
        self.cross = CrossScaleAttention(hidden, n, heads, attention_dropout)
        self.poolings = nn.ModuleList([AttentionPooling(hidden, attn_dim, gated=gated, dropout=attention_dropout)
                                       for _ in mags])
        if fusion == "attention":
            self.fusion = AttentionPooling(hidden, attn_dim, gated=gated, dropout=attention_dropout)
        else:
            self.fusion = nn.Sequential(nn.Linear(n * hidden, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(hidden, n_classes)
        self.instance_classifiers = nn.ModuleList([nn.Linear(hidden, 2) for _ in range(n_classes)])

    @classmethod
    def infer_kwargs(cls, bag) -> dict:
        return {"magnifications": [float(m) for m in bag.magnifications]}

    @classmethod
    def search_space(cls, trial) -> dict:
        return {
            "k_sample": trial.suggest_categorical("k_sample", [4, 8, 16]),
            "bag_weight": trial.suggest_float("bag_weight", 0.5, 0.9),
            "fusion": trial.suggest_categorical("fusion", list(FUSIONS)),
        }

    def _check(self, bag: MultiscaleBag) -> None:
        if not isinstance(bag, MultiscaleBag):
            raise TypeError(f"cma_mil reads a MultiscaleBag; got {type(bag).__name__}")
        mags = bag.magnifications
        if len(mags) != len(self.magnifications) or not all(
                math.isclose(a, b) for a, b in zip(mags, self.magnifications)):
            raise ValueError(f"cma_mil was built for magnifications {self.magnifications}; the bag has {mags}")
        for m in mags:
            x = bag.features[m]
            if x.ndim != 2 or x.shape[1] != self.in_dim or x.shape[0] == 0:
                raise ValueError(f"cma_mil: expected a non-empty ({self.in_dim}-d) bag at {m:g}x; "
                                 f"got {tuple(x.shape)}")

    def forward(self, bag: MultiscaleBag) -> MILOutput:
        self._check(bag)
        mags = bag.magnifications
        index = {m: i for i, m in enumerate(mags)}
        parents = {(index[f], index[c]): p for (f, c), p in bag.parents.items()}
        h = [proj(bag.features[m]) for proj, m in zip(self.projectors, mags)]
        reps, att, cross = [], {}, {}
        z_fine = scores_fine = None
        for s, m in enumerate(mags):
            tokens, present = aligned_tokens(h, parents, s)
            z, w = self.cross(h[s], tokens, present, s)
            scores = self.poolings[s].scores(z)[:, 0]
            a = torch.softmax(scores, dim=0)
            reps.append(a @ z)
            att[m], cross[m] = a, w
            z_fine, scores_fine = z, scores
        r = torch.stack(reps)  # (S, hidden)
        extras = {"attention": att, "cross_attention": cross, "h": z_fine, "magnifications": list(mags)}
        if self.fusion_mode == "attention":
            fused, w = self.fusion(r)
            fused = fused[0]
            extras["scale_weights"] = w[:, 0]
        else:
            fused = self.fusion(r.reshape(1, -1))[0]
        extras["embedding"] = fused
        logits = self.classifier(fused)
        return MILOutput(logits=logits, attention=att[mags[-1]], extras=extras)

    def instance_loss(self, output: MILOutput, label: Tensor) -> Tensor:
        """CLAM's clustering loss on the finest scale (ranking by that scale's attention)."""
        attention = output.attention
        return self.clustering_instance_loss(output.extras["h"], label, lambda c: attention)

    def loss(self, output: MILOutput, label: Tensor, class_weights: Tensor | None = None) -> dict[str, Tensor]:
        ce = weighted_cross_entropy(output.logits, label, class_weights)
        inst = self.instance_loss(output, label)
        total = self.bag_weight * ce + (1.0 - self.bag_weight) * inst
        return {"ce": ce, "instance": inst, "total": total}
