"""The contract every MIL model implements (torchmil-style).

``forward(bag)`` takes one bag ``(N, D)`` and returns :class:`MILOutput` with bag ``logits``
``(n_classes,)``, ``attention`` ``(N,)`` softmax-normalised over the bag (used for heatmaps) and
model-specific ``extras``. ``loss(output, label)`` returns named loss terms plus ``"total"``, the sum
that training optimises.

``bag_type`` (class attribute) says what ``forward`` reads: ``"flat"`` (the ``(N, D)`` bag above),
``"multiscale"`` (:class:`slidesnake.bags.MultiscaleBag`: one slide at several magnifications with
parent links) or ``"hierarchical"`` (:class:`slidesnake.bags.CaseBag`: a patient's slides grouped by
stain). The training and inference code builds the matching bag from the feature stores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class MILOutput:
    logits: Tensor  # (n_classes,)
    attention: Tensor  # (N,), sums to 1 over the bag
    extras: dict = field(default_factory=dict)


class MILModel(nn.Module):
    """Base class: stores ``in_dim`` / ``n_classes``; default loss is (weighted) cross-entropy."""

    model_name: ClassVar[str] = ""
    #: What ``forward`` reads: "flat", "multiscale" or "hierarchical" (see slidesnake.bags).
    bag_type: ClassVar[str] = "flat"

    def __init__(self, in_dim: int, n_classes: int):
        super().__init__()
        if in_dim < 1 or n_classes < 2:
            raise ValueError(f"need in_dim >= 1 and n_classes >= 2; got {in_dim}, {n_classes}")
        self.in_dim = int(in_dim)
        self.n_classes = int(n_classes)

    @classmethod
    def infer_kwargs(cls, bag) -> dict:
        """Constructor arguments read off a training bag (e.g. a multiscale bag's magnifications).

        ``train_fold`` adds them to the model's kwargs, so they are saved in the checkpoint.
        """
        return {}

    def check_bag(self, bag: Tensor) -> None:
        if bag.ndim != 2 or bag.shape[1] != self.in_dim:
            raise ValueError(f"{type(self).__name__}: expected a bag (N, {self.in_dim}); got {tuple(bag.shape)}")
        if bag.shape[0] == 0:
            raise ValueError(f"{type(self).__name__}: empty bag (0 instances)")

    def forward(self, bag: Tensor) -> MILOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def single_instance_logits(self, instances: Tensor) -> Tensor:
        """Logits ``(N, n_classes)`` of each instance of ``instances`` ``(N, D)`` scored alone, as a bag
        of one (all attention on it): the patch-by-patch predictions of flat models.

        This default runs ``forward`` once per instance; models override it with a batched
        computation giving the same logits.
        """
        if self.bag_type != "flat":
            raise NotImplementedError(f"{type(self).__name__} reads {self.bag_type!r} bags; "
                                      "a single instance is not a bag it can score")
        self.check_bag(instances)
        return torch.stack([self(instances[i:i + 1]).logits for i in range(instances.shape[0])])

    def loss(self, output: MILOutput, label: Tensor, class_weights: Tensor | None = None) -> dict[str, Tensor]:
        ce = weighted_cross_entropy(output.logits, label, class_weights)
        return {"ce": ce, "total": ce}


def weighted_cross_entropy(logits: Tensor, label: Tensor, class_weights: Tensor | None = None) -> Tensor:
    """Cross-entropy of one bag scaled by its class weight.

    ``F.cross_entropy(weight=...)`` with the default mean reduction divides by the weight of the
    target, which cancels the weight entirely for a batch of one bag; the weight is applied here
    as a plain factor instead.
    """
    label = label.reshape(1).long()
    ce = F.cross_entropy(logits.reshape(1, -1), label, reduction="none")[0]
    if class_weights is not None:
        ce = ce * class_weights.to(ce.dtype)[label[0]]
    return ce

