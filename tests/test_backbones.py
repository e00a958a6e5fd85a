"""Backbone registry: every backbone builds, weight files load (or fail clearly), no downloads."""

import logging

import pytest
import torch
from safetensors.torch import save_file

from slidesnake.backbones import create_backbone, list_backbones, sha256_file

NAMED = ["resnet50_trunc", "resnet18_trunc", "shufflenet_v2", "densenet121"]


@pytest.mark.parametrize("name", NAMED + ["timm:resnet18", "timm:vit_tiny_patch16_224"])
def test_builds_with_feature_dim(name, caplog):
    with caplog.at_level(logging.WARNING):
        bb = create_backbone(name, weights="none")
    assert "NOT pretrained" in caplog.text
    assert bb.weights == "none" and bb.weights_sha256 is None
    with torch.inference_mode():
        y = bb.model(torch.rand(2, 3, bb.input_size, bb.input_size))
    assert y.shape == (2, bb.feature_dim)
    assert bb.compute_dtype("cpu") == torch.float32 and bb.compute_dtype("cuda") == torch.bfloat16


def test_registry_lists_names_and_rejects_unknown():
    assert set(NAMED) <= set(list_backbones()) and "timm:<model_name>" in list_backbones()
    with pytest.raises(KeyError, match="unknown backbone 'resnet51'"):
        create_backbone("resnet51")


def test_seed_makes_random_init_reproducible():
    a, b, c = (create_backbone("resnet18_trunc", seed=s).model for s in (1, 1, 2))
    wa, wb, wc = (m.conv1.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def _features(model, x):
    with torch.inference_mode():
        return model.eval()(x)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_loads_full_state_dict(tmp_path, suffix):
    import torchvision

    torch.manual_seed(3)
    src = torchvision.models.resnet18(weights=None)
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
        bb = create_backbone("resnet18_trunc", weights=path, strip_prefix="module.")
    else:
        save_file(src.state_dict(), str(path))
        bb = create_backbone("resnet18_trunc", weights=path)
    assert bb.weights == str(path.resolve()) and bb.weights_sha256 == sha256_file(path)

    x = torch.rand(2, 3, 224, 224)
    s = src.eval()
    with torch.inference_mode():
        h = s.layer3(s.layer2(s.layer1(s.maxpool(s.relu(s.bn1(s.conv1(x)))))))
    torch.testing.assert_close(_features(bb.model, x), h.mean((2, 3)))


def test_loads_truncated_trunk_state_dict(tmp_path):
    src = create_backbone("resnet18_trunc", seed=5)
    path = tmp_path / "trunk.pt"
    torch.save(src.model.state_dict(), path)  # no layer4 / fc keys: fits the trunk only
    bb = create_backbone("resnet18_trunc", weights=path)
    x = torch.rand(2, 3, 224, 224)
    torch.testing.assert_close(_features(bb.model, x), _features(src.model, x))


def test_timm_checkpoint_with_classifier_head_loads(tmp_path):
    import timm

    src = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    path = tmp_path / "timm.safetensors"
    save_file(src.state_dict(), str(path))  # includes fc.*, dropped for num_classes=0
    bb = create_backbone("timm:resnet18", weights=path)
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        ref = src.eval().forward_head(src.forward_features(x), pre_logits=True)
    torch.testing.assert_close(_features(bb.model, x), ref)


def test_rejects_mismatched_state_dict(tmp_path):
    import torchvision

    path = tmp_path / "wrong.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match=r"wrong\.pth.*missing keys.*unexpected keys"):
        create_backbone("resnet50_trunc", weights=path)

    prefixed = tmp_path / "prefixed.pth"
    torch.save({"model": {f"module.{k}": v for k, v in
                          torchvision.models.resnet18(weights=None).state_dict().items()}}, prefixed)
    with pytest.raises(ValueError, match=r"prefixed\.pth.*strip_prefix"):
        create_backbone("resnet18_trunc", weights=prefixed)


def test_imagenet_without_cached_file_names_file_and_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected_dir = tmp_path / "hub" / "checkpoints"
    with pytest.raises(FileNotFoundError) as e:
        create_backbone("resnet50_trunc", weights="imagenet")
    assert "resnet50-0676ba61.pth" in str(e.value) and str(expected_dir) in str(e.value)


def test_imagenet_uses_cached_file(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    fake = cache / "shufflenetv2_x1-5666bf0f80.pth"
    torch.save(torchvision.models.shufflenet_v2_x1_0(weights=None).state_dict(), fake)
    # a random file under torchvision's name is not the published file: its sha256 does not start
    # with the hash the name carries (what torch.hub checks when it downloads)
    with pytest.raises(ValueError) as e:
        create_backbone("shufflenet_v2", weights="imagenet")
    assert "\n" not in str(e.value) and str(fake) in str(e.value) and sha256_file(fake) in str(e.value)
    assert "5666bf0f80" in str(e.value)

    # a file whose content matches its name's hash prefix is used
    from slidesnake import backbones

    real = cache / f"shufflenetv2_x1-{sha256_file(fake)[:10]}.pth"
    fake.rename(real)
    monkeypatch.setattr(backbones, "_find_imagenet_file", lambda *a: real)
    bb = create_backbone("shufflenet_v2", weights="imagenet")
    assert bb.weights == f"imagenet:{real.name}" and bb.weights_sha256 == sha256_file(real)
