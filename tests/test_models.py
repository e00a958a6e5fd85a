"""MIL model contract, shared layers and the registry."""

from __future__ import annotations

import pytest
import torch

from slidesnake.models import MILModel, MILOutput, create_model, list_models, register_model
from slidesnake.models.layers import MLP, AttentionPooling


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("n_classes", [2, 4])
def test_abmil_forward_and_loss(gated, n_classes):
    torch.manual_seed(0)
    model = create_model("abmil", in_dim=32, n_classes=n_classes, gated=gated, hidden=16)
    assert isinstance(model, MILModel) and model.model_name == "abmil"
    out = model(torch.randn(7, 32))
    assert isinstance(out, MILOutput)
    assert out.logits.shape == (n_classes,)
    assert out.attention.shape == (7,)
    assert torch.all(out.attention >= 0)
    assert out.attention.sum().item() == pytest.approx(1.0, abs=1e-6)
    losses = model.loss(out, torch.tensor(1))
    assert "total" in losses and losses["total"].ndim == 0
    losses["total"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_abmil_defaults_and_single_instance():
    model = create_model("abmil", 64, 2)
    assert model.pooling.gated and model.pooling.V[0].out_features == 128
    assert model.classifier.in_features == 256
    model.eval()
    out = model(torch.randn(1, 64))
    assert out.attention.tolist() == [1.0]
    with pytest.raises(ValueError, match="empty bag"):
        model(torch.zeros(0, 64))
    with pytest.raises(ValueError, match=r"expected a bag \(N, 64\)"):
        model(torch.zeros(3, 10))


def test_class_weights_scale_the_loss():
    model = create_model("abmil", 8, 2, hidden=8)
    out = model(torch.randn(5, 8))
    plain = model.loss(out, torch.tensor(1))["total"]
    weighted = model.loss(out, torch.tensor(1), torch.tensor([0.5, 3.0]))["total"]
    assert weighted.item() == pytest.approx(3.0 * plain.item(), rel=1e-6)


def test_gated_attention_formula():
    torch.manual_seed(0)
    pool = AttentionPooling(6, attn_dim=4, gated=True)
    h = torch.randn(5, 6)
    a = pool.w(torch.tanh(pool.V[0](h)) * torch.sigmoid(pool.U[0](h)))
    pooled, att = pool(h)
    assert torch.allclose(att, torch.softmax(a, 0))
    assert torch.allclose(pooled, att.T @ h)
    multi = AttentionPooling(6, 4, gated=False, n_heads=3)
    pooled, att = multi(h)
    assert pooled.shape == (3, 6) and att.shape == (5, 3)
    assert torch.allclose(att.sum(0), torch.ones(3))
    assert MLP(6, [8, 3]).out_dim == 3


def test_registry():
    assert "abmil" in list_models()
    with pytest.raises(ValueError, match="unknown MIL model 'nope'; known models: .*abmil"):
        create_model("nope", 8, 2)
    with pytest.raises(TypeError, match="unknown option.*'hiden'.*accepted.*hidden"):
        create_model("abmil", 8, 2, hiden=3)

    @register_model("_test_mean_pool")
    class MeanPool(MILModel):
        def __init__(self, in_dim, n_classes):
            super().__init__(in_dim, n_classes)
            self.fc = torch.nn.Linear(in_dim, n_classes)

        def forward(self, bag):
            att = torch.full((len(bag),), 1.0 / len(bag))
            return MILOutput(self.fc(att @ bag), att)

    try:
        m = create_model("_test_mean_pool", 4, 3)
        assert m(torch.randn(2, 4)).logits.shape == (3,)
        with pytest.raises(ValueError, match="already registered"):
            register_model("abmil")(MeanPool)
        with pytest.raises(TypeError, match="not a MILModel"):
            register_model("x")(object)
    finally:
        from slidesnake import models

        models._REGISTRY.pop("_test_mean_pool", None)
