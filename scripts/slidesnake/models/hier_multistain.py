"""Hierarchical multi-stain attention MIL: patch -> slice -> stain -> case.

Reads a :class:`~slidesnake.bags.CaseBag` (``bag_type = "hierarchical"``): for one patient, every
stain's slides (slices), each a bag of frozen patch features. As the hierarchical attention MIL of
the multi-stain seed method (one case = several stains, each with several slices):

1. **Patch projector** (trainable, over the frozen features): ``Linear(in_dim, hidden) + ReLU +
   Dropout``, shared by all stains.
2. **Patch attention** within each slice -> slice embedding.
3. **Slice attention** across the slices of one stain -> stain embedding.
4. **Stain attention** across the stains of the case -> case embedding.
5. **Classifier** ``Dropout + Linear(hidden, n_classes)``.

Each level is gated attention pooling (Ilse et al. 2018; ``gated=False``: the tanh-only form), one
module per level shared by all slices / stains.

Sampling: in training a random subset of at most ``per_slice_cap`` patches of each slice and of at
most ``max_slices_per_stain`` slices of each stain is drawn at every forward pass (so anew each
epoch), from a generator owned by the model and seeded from the training seed; evaluation uses
every patch and every slice. ``None`` disables a cap.

Regularisers, each with a weight per level (``patch``, ``slice``, ``stain``; a single number applies
to all three), all zero by default:

- ``entropy_weight``: penalty on the Shannon entropy (nats) of the attention distributions of the
  level, averaged over them (favours concentrated attention); a negative weight rewards entropy
  instead (spread-out attention, as attention-entropy maximisation, Zhang et al. 2024);
- ``l1_weight`` / ``l2_weight``: elastic net on the level's attention logits (pre-softmax scores),
  ``mean |s|`` and ``mean s^2`` over every logit of the level.

``loss`` returns ``ce``, ``entropy_<level>``, ``l1_<level>``, ``l2_<level>`` (already weighted) and
``total``.

Outputs: ``attention`` is the effective attention of every patch of the case (stain weight x slice
weight x patch weight, concatenated in bag order: stains, slides, patches; sums to 1). ``extras``:
``stains`` (order used), ``stain_attention`` ``(n_stains,)``, ``slice_attention[stain]``
``(n_slices,)``, ``slice_index[stain]`` / ``slice_ids[stain]`` (the slices used: positions in the bag
and slide ids), ``patch_attention[slide_id]`` (within the
slide, sums to 1), ``patch_index[slide_id]`` (patch rows used; ``None`` = all), ``slide_weight[slide_id]``
(stain weight x slice weight).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from slidesnake.bags import CaseBag
from slidesnake.models import register_model
from slidesnake.models.base import MILModel, MILOutput, weighted_cross_entropy
from slidesnake.models.layers import MLP, AttentionPooling

LEVELS = ("patch", "slice", "stain")


def _level_weights(name: str, value, signed: bool = False) -> dict[str, float]:
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(LEVELS))
        if unknown:
            raise ValueError(f"hier_multistain: {name} has unknown level(s) {unknown}; levels are {list(LEVELS)}")
        out = {lv: float(value.get(lv, 0.0)) for lv in LEVELS}
    else:
        out = {lv: float(value) for lv in LEVELS}
    if not signed and any(v < 0 for v in out.values()):
        raise ValueError(f"hier_multistain: {name} must be >= 0; got {value!r}")
    return out


def entropy(scores: Tensor) -> Tensor:
    """Shannon entropy (nats) of ``softmax(scores)``."""
    logp = torch.log_softmax(scores, dim=0)
    return -(logp.exp() * logp).sum()


@register_model("hier_multistain")
class HierMultiStainMIL(MILModel):
    """Patch -> slice -> stain -> case attention MIL (see the module docstring)."""

    bag_type = "hierarchical"

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 512, attn_dim: int = 128, gated: bool = True,
                 dropout: float = 0.3, attention_dropout: float = 0.0, per_slice_cap: int | None = 500,
                 max_slices_per_stain: int | None = 5, entropy_weight=0.0, l1_weight=0.0, l2_weight=0.0,
                 seed: int | None = None):
        super().__init__(in_dim, n_classes)
        for name, cap in (("per_slice_cap", per_slice_cap), ("max_slices_per_stain", max_slices_per_stain)):
            if cap is not None and int(cap) < 1:
                raise ValueError(f"hier_multistain: {name} must be >= 1 or null; got {cap}")
        self.per_slice_cap = None if per_slice_cap is None else int(per_slice_cap)
        self.max_slices_per_stain = None if max_slices_per_stain is None else int(max_slices_per_stain)
        self.entropy_weight = _level_weights("entropy_weight", entropy_weight, signed=True)
        self.l1_weight = _level_weights("l1_weight", l1_weight)
        self.l2_weight = _level_weights("l2_weight", l2_weight)
        self.projector = MLP(in_dim, hidden, dropout)
        self.pool = nn.ModuleDict({lv: AttentionPooling(hidden, attn_dim, gated=gated, dropout=attention_dropout)
                                   for lv in LEVELS})
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, n_classes))
        self.generator = torch.Generator()
        # Without an explicit seed, draw one from the global RNG, which train_fold seeds with the
        # training seed just before building the model: sampling is reproducible per training seed.
        self.generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed))

    @classmethod
    def search_space(cls, trial) -> dict:
        return {
            "per_slice_cap": trial.suggest_categorical("per_slice_cap", [200, 500, 800]),
            "entropy_weight": trial.suggest_float("entropy_weight", 1e-4, 1e-1, log=True),
            "l1_weight": trial.suggest_float("l1_weight", 1e-5, 1e-2, log=True),
        }

    def _subset(self, n: int, cap: int | None) -> Tensor | None:
        """Sorted random rows (training, more than ``cap``) or None (all)."""
        if not self.training or cap is None or n <= cap:
            return None
        return torch.randperm(n, generator=self.generator)[:cap].sort().values

    def _pool(self, level: str, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        scores = self.pool[level].scores(h)[:, 0]
        a = torch.softmax(scores, dim=0)
        return a @ h, a, scores

    def _check(self, bag: CaseBag) -> None:
        if not isinstance(bag, CaseBag):
            raise TypeError(f"hier_multistain reads a CaseBag; got {type(bag).__name__}")
        for stain, arrays in bag.stains.items():
            if len(arrays) != len(bag.slide_ids.get(stain, [])):
                raise ValueError(f"hier_multistain: stain {stain!r} has {len(arrays)} arrays but "
                                 f"{len(bag.slide_ids.get(stain, []))} slide ids")
            for x in arrays:
                if x.ndim != 2 or x.shape[1] != self.in_dim:
                    raise ValueError(f"hier_multistain: expected (N, {self.in_dim}) slices; got {tuple(x.shape)}")
        if not any(len(x) for arrays in bag.stains.values() for x in arrays):
            raise ValueError("hier_multistain: empty case (no patch in any slide)")

    def forward(self, bag: CaseBag) -> MILOutput:
        self._check(bag)
        logits_by_level: dict[str, list[Tensor]] = {lv: [] for lv in LEVELS}
        stain_embs, stains = [], []
        slice_att, slice_index, slice_ids, patch_att, patch_index = {}, {}, {}, {}, {}
        for stain, arrays in bag.stains.items():
            slices = [j for j, x in enumerate(arrays) if len(x)]
            pick = self._subset(len(slices), self.max_slices_per_stain)
            if pick is not None:
                slices = [slices[j] for j in pick.tolist()]
            if not slices:
                continue
            embs = []
            for j in slices:
                x = arrays[j]
                rows = self._subset(len(x), self.per_slice_cap)
                if rows is not None:
                    x = x[rows.to(x.device)]
                emb, a, s = self._pool("patch", self.projector(x))
                sid = bag.slide_ids[stain][j]
                patch_att[sid], patch_index[sid] = a, rows
                logits_by_level["patch"].append(s)
                embs.append(emb)
            emb, a, s = self._pool("slice", torch.stack(embs))
            logits_by_level["slice"].append(s)
            slice_att[stain], slice_index[stain] = a, slices
            slice_ids[stain] = [bag.slide_ids[stain][j] for j in slices]
            stain_embs.append(emb)
            stains.append(stain)
        case, a_stain, s = self._pool("stain", torch.stack(stain_embs))
        logits_by_level["stain"].append(s)
        logits = self.classifier(case)

        slide_weight, flat = {}, []
        for k, stain in enumerate(stains):
            for w_slice, sid in zip(slice_att[stain], slice_ids[stain]):
                slide_weight[sid] = a_stain[k] * w_slice
                flat.append(slide_weight[sid] * patch_att[sid])
        extras = {
            "stains": stains, "stain_attention": a_stain, "slice_attention": slice_att,
            "slice_index": slice_index, "slice_ids": slice_ids, "patch_attention": patch_att,
            "patch_index": patch_index,
            "slide_weight": slide_weight, "attention_logits": logits_by_level, "embedding": case,
        }
        return MILOutput(logits=logits, attention=torch.cat(flat), extras=extras)

    def regularisers(self, output: MILOutput) -> dict[str, Tensor]:
        """Weighted entropy and elastic-net terms of every level (zero where the weight is 0)."""
        terms = {}
        zero = output.logits.new_zeros(())
        for lv in LEVELS:
            scores = output.extras["attention_logits"][lv]
            w_ent, w_l1, w_l2 = self.entropy_weight[lv], self.l1_weight[lv], self.l2_weight[lv]
            terms[f"entropy_{lv}"] = w_ent * torch.stack([entropy(s) for s in scores]).mean() if w_ent else zero
            flat = torch.cat(scores) if (w_l1 or w_l2) else None
            terms[f"l1_{lv}"] = w_l1 * flat.abs().mean() if w_l1 else zero
            terms[f"l2_{lv}"] = w_l2 * flat.pow(2).mean() if w_l2 else zero
        return terms

    def loss(self, output: MILOutput, label: Tensor, class_weights: Tensor | None = None) -> dict[str, Tensor]:
        terms = {"ce": weighted_cross_entropy(output.logits, label, class_weights), **self.regularisers(output)}
        terms["total"] = sum(terms.values())
        return terms
