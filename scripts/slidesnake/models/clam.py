"""CLAM: clustering-constrained attention MIL (Lu et al., Nature Biomedical Engineering 2021).

As the authors' ``models/model_clam.py`` (``CLAM_SB`` / ``CLAM_MB``) and its training loop:

- ``Linear(in_dim, 512) + ReLU + Dropout`` then gated attention (``Attn_Net_Gated``: tanh and
  sigmoid branches of width 256, dropout on both) with one attention branch (single-branch, SB)
  or one per class (``multi_branch``, MB);
- SB: one linear bag classifier on the attention-pooled representation; MB: one pooled
  representation per class and a class-specific ``Linear(512, 1)`` per class giving that class's
  logit;
- instance-level clustering: one ``Linear(512, 2)`` instance classifier per class. For the
  label's ("in-the-class") branch the ``k`` most attended instances are pseudo-labelled positive
  (1) and the ``k`` least attended negative (0); with ``subtyping`` every other ("out-of-the-class")
  branch's ``k`` most attended instances are pseudo-labelled negative, and the summed instance
  loss is divided by the number of classes;
- instance loss: the smooth top-1 SVM of Berrada et al. 2018 (``topk.svm.SmoothTop1SVM(n_classes=2)``,
  alpha 1, tau 1, as CLAM's ``--inst_loss svm``) or cross-entropy;
- ``total = bag_weight * bag_loss + (1 - bag_weight) * instance_loss``.

Bags with fewer than ``2 * k_sample`` instances use ``k = N // 2`` (CLAM's ``torch.topk`` would
fail); a bag of one instance has no instance term (a zero).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slidesnake.models import register_model
from slidesnake.models.base import MILModel, MILOutput, weighted_cross_entropy
from slidesnake.models.layers import MLP, AttentionPooling

INSTANCE_LOSSES = ("svm", "ce")


def smooth_top1_svm_loss(logits: Tensor, target: Tensor, alpha: float = 1.0, tau: float = 1.0) -> Tensor:
    """Smooth top-1 multi-class SVM loss (Berrada et al., ICLR 2018), mean over the rows.

    ``tau * logsumexp_j((alpha * [j != y] + s_j - s_y) / tau)``, as ``topk.svm.SmoothTop1SVM``
    (which switches to the hard max for rows whose top score leads by >= ``tau * log(1000)``, a
    numerical safeguard that ``torch.logsumexp`` does not need; the two differ there by < 0.001).
    """
    target = target.long()
    margin = alpha * (1.0 - F.one_hot(target, logits.shape[-1]).to(logits.dtype))
    x = logits + margin - logits.gather(1, target[:, None])
    return (tau * torch.logsumexp(x / tau, dim=1)).mean()


def top_bottom_k(attention: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Indices of the ``k`` most and the ``k`` least attended instances of one branch ``(N,)``."""
    return torch.topk(attention, k).indices, torch.topk(-attention, k).indices


def instance_eval(attention: Tensor, h: Tensor, classifier: nn.Module, k: int, in_class: bool,
                  loss_fn) -> tuple[Tensor, Tensor, Tensor]:
    """CLAM's ``inst_eval`` / ``inst_eval_out`` for one branch: (loss, instance indices, pseudo-labels).

    In-the-class: top-k -> 1, bottom-k -> 0. Out-of-the-class: top-k -> 0.
    """
    top, bottom = top_bottom_k(attention, k)
    if in_class:
        idx = torch.cat([top, bottom])
        targets = torch.cat([torch.ones(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)]).to(h.device)
    else:
        idx = top
        targets = torch.zeros(k, dtype=torch.long, device=h.device)
    return loss_fn(classifier(h[idx]), targets), idx, targets


def clustering_loss(h: Tensor, label: Tensor, classifiers, k: int, subtyping: bool, loss_fn,
                    attention_of) -> Tensor:
    """CLAM's instance-level loss of one bag: the in-class branch's top-k as positives and bottom-k
    as negatives, and (``subtyping``) every out-of-class branch's top-k as negatives, averaged over
    the branches then. ``attention_of(c)`` is the attention that ranks instances for class ``c``."""
    y = int(label)
    total = h.new_zeros(())
    for c, classifier in enumerate(classifiers):
        if c != y and not subtyping:
            continue
        loss, _, _ = instance_eval(attention_of(c), h, classifier, k, c == y, loss_fn)
        total = total + loss
    return total / len(classifiers) if subtyping else total


class InstanceClustering:
    """CLAM's instance-level clustering loss, shared by :class:`CLAM` and
    :class:`slidesnake.models.cma_mil.CMAMIL`. The model sets ``instance_classifiers`` (one
    ``Linear(hidden, 2)`` per class), ``k_sample``, ``inst_loss`` and ``subtyping``."""

    def instance_loss_fn(self, logits: Tensor, targets: Tensor) -> Tensor:
        if self.inst_loss == "svm":
            return smooth_top1_svm_loss(logits, targets)
        return F.cross_entropy(logits, targets)

    def clustering_instance_loss(self, h: Tensor, label: Tensor, attention_of) -> Tensor:
        """The clustering loss of one bag with instance embeddings ``h`` ``(N, hidden)``;
        ``attention_of(c)`` ranks the instances for class ``c``. ``k = min(k_sample, N // 2)``; a bag
        too small for one pair has no instance term (a zero)."""
        k = min(self.k_sample, h.shape[0] // 2)
        if k == 0:
            return h.new_zeros(())
        return clustering_loss(h, label, self.instance_classifiers, k, self.subtyping, self.instance_loss_fn,
                               attention_of)


@register_model("clam")
class CLAM(InstanceClustering, MILModel):
    """CLAM-SB (default) or CLAM-MB (``multi_branch=True``).

    ``attention`` output: SB: the single branch; MB: the branch of the predicted class (as CLAM's
    heatmap code). ``extras``: ``h`` (instance embeddings), ``attention_branches`` ``(K, N)``,
    ``embedding`` (pooled ``(K, hidden)``).
    """

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 512, attn_dim: int = 256, gated: bool = True,
                 dropout: float = 0.25, multi_branch: bool = False, k_sample: int = 8, inst_loss: str = "svm",
                 bag_weight: float = 0.7, subtyping: bool = False):
        super().__init__(in_dim, n_classes)
        if inst_loss not in INSTANCE_LOSSES:
            raise ValueError(f"clam: inst_loss must be one of {INSTANCE_LOSSES}; got {inst_loss!r}")
        if not 0.0 <= bag_weight <= 1.0:
            raise ValueError(f"clam: bag_weight must be in [0, 1]; got {bag_weight}")
        if k_sample < 1:
            raise ValueError(f"clam: k_sample must be >= 1; got {k_sample}")
        self.multi_branch = bool(multi_branch)
        self.k_sample = int(k_sample)
        self.inst_loss = inst_loss
        self.bag_weight = float(bag_weight)
        self.subtyping = bool(subtyping)
        self.projector = MLP(in_dim, hidden, dropout)
        self.pooling = AttentionPooling(hidden, attn_dim, gated=gated, dropout=dropout,
                                        n_heads=n_classes if self.multi_branch else 1)
        if self.multi_branch:
            self.classifiers = nn.ModuleList([nn.Linear(hidden, 1) for _ in range(n_classes)])
        else:
            self.classifiers = nn.Linear(hidden, n_classes)
        self.instance_classifiers = nn.ModuleList([nn.Linear(hidden, 2) for _ in range(n_classes)])

    @classmethod
    def search_space(cls, trial) -> dict:
        return {
            "k_sample": trial.suggest_categorical("k_sample", [4, 8, 16, 32]),
            "bag_weight": trial.suggest_float("bag_weight", 0.5, 0.9),
            "inst_loss": trial.suggest_categorical("inst_loss", list(INSTANCE_LOSSES)),
        }

    def forward(self, bag: Tensor) -> MILOutput:
        self.check_bag(bag)
        h = self.projector(bag)
        pooled, att = self.pooling(h)  # (K, hidden), (N, K)
        branches = att.transpose(0, 1)  # (K, N)
        if self.multi_branch:
            logits = torch.cat([clf(pooled[c]) for c, clf in enumerate(self.classifiers)])
            attention = branches[int(logits.argmax())]
        else:
            logits = self.classifiers(pooled)[0]
            attention = branches[0]
        return MILOutput(logits=logits, attention=attention,
                         extras={"h": h, "attention_branches": branches, "embedding": pooled})

    def single_instance_logits(self, instances: Tensor) -> Tensor:
        # a bag of one: every branch's attention is 1, so each pooled representation is the embedding
        self.check_bag(instances)
        h = self.projector(instances)
        if self.multi_branch:
            return torch.cat([clf(h) for clf in self.classifiers], dim=1)
        return self.classifiers(h)

    def instance_loss(self, output: MILOutput, label: Tensor) -> Tensor:
        """The clustering loss of one bag (see the module docstring)."""
        branches = output.extras["attention_branches"]
        return self.clustering_instance_loss(output.extras["h"], label,
                                             lambda c: branches[c] if self.multi_branch else branches[0])

    def loss(self, output: MILOutput, label: Tensor, class_weights: Tensor | None = None) -> dict[str, Tensor]:
        bag = weighted_cross_entropy(output.logits, label, class_weights)
        inst = self.instance_loss(output, label)
        total = self.bag_weight * bag + (1.0 - self.bag_weight) * inst
        return {"bag": bag, "instance": inst, "total": total}
