"""ABMIL: attention-based deep MIL (Ilse, Tomczak & Welling, ICML 2018)."""

from __future__ import annotations

from torch import Tensor, nn

from slidesnake.models import register_model
from slidesnake.models.base import MILModel, MILOutput
from slidesnake.models.layers import MLP, AttentionPooling


@register_model("abmil")
class ABMIL(MILModel):
    """Linear+ReLU+Dropout projector, (gated) attention pooling, linear classifier."""

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 256, attn_dim: int | None = None,
                 gated: bool = True, dropout: float = 0.25, attention_dropout: float = 0.0):
        super().__init__(in_dim, n_classes)
        self.projector = MLP(in_dim, hidden, dropout)
        self.pooling = AttentionPooling(hidden, attn_dim or max(1, hidden // 2), gated=gated,
                                        dropout=attention_dropout)
        self.classifier = nn.Linear(hidden, n_classes)

    @classmethod
    def search_space(cls, trial) -> dict:
        """Model knobs searched by slidesnake.tuning (lr, weight_decay and dropout are searched there)."""
        return {"hidden": trial.suggest_categorical("hidden", [64, 128, 256, 512]),
                "gated": trial.suggest_categorical("gated", [True, False])}

    def forward(self, bag: Tensor) -> MILOutput:
        self.check_bag(bag)
        h = self.projector(bag)
        pooled, attention = self.pooling(h)  # (1, hidden), (N, 1)
        logits = self.classifier(pooled)[0]
        return MILOutput(logits=logits, attention=attention[:, 0], extras={"embedding": pooled[0]})

    def single_instance_logits(self, instances: Tensor) -> Tensor:
        # a bag of one: attention 1, the pooled representation is the instance's embedding
        self.check_bag(instances)
        return self.classifier(self.projector(instances))
