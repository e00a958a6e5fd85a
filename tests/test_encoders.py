"""Pathology foundation-model presets without the real weights (not available here).

For every preset: build its architecture at reduced depth, save random weights in the publisher's
layout and key names (HF model folder, CoCa checkpoint, old-timm Swin, transformers-4 names, ...),
load them through the preset and compare dimension, normalisation and pooling against the same
model built directly from the model card's recipe on the same uint8 tiles. Plus one full-size UNI
(ViT-L/16) load, sha256 verification, shards / HF cache snapshots, the escape hatch and errors.
"""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from slidesnake.backbones import BackboneError, create_backbone
from slidesnake.features import _Embedder
from slidesnake.presets import PRESETS, backbone_dirname, check_backbone_name
from slidesnake.weightfiles import WeightsError, combined_sha256, file_hashes

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HOPT = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))


def tiles(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    """uint8 (n, size, size, 3) tiles, as the extractor's DataLoader delivers them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)


def card_input(t: torch.Tensor, mean, std) -> torch.Tensor:
    """The card's transform on tiles already at the input size: ToTensor + Normalize(mean, std)."""
    x = t.permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def through_preset(bb, t: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(_Embedder(bb, torch.device("cpu"))(t))


def seeded(fn, seed=1):
    torch.manual_seed(seed)
    return fn().eval()


def hf_folder(path, state: dict, config: dict, name="pytorch_model.bin"):
    """A Hugging Face model folder as published: config.json + weights file."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(path / name), metadata={"format": "pt"})
    else:
        torch.save(state, path / name)
    return path


# ------------------------------------------------------------------------------------------ timm presets

# The model card's recipe (timm.create_model arguments; depth reduced) and its pooling of model(x).
TIMM_CARDS = {
    "uni": ("vit_large_patch16_224", dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0,
                                          dynamic_img_size=True), IMAGENET, lambda out: out),
    "uni2_h": ("vit_giant_patch14_224", dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5,
                                             embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True,
                                             mlp_layer=timm.layers.SwiGLUPacked, act_layer=nn.SiLU, reg_tokens=8,
                                             dynamic_img_size=True), IMAGENET, lambda out: out),
    # Virchow2 card: output = model(x) tokens; class token || mean of patch tokens (after 1 + 4 register)
    "virchow2": ("vit_huge_patch14_224", dict(img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4,
                                              mlp_ratio=5.3375, global_pool="", dynamic_img_size=True,
                                              mlp_layer=timm.layers.SwiGLUPacked, act_layer=nn.SiLU), IMAGENET,
                 lambda out: torch.cat([out[:, 0], out[:, 5:].mean(1)], dim=-1)),
    "h_optimus_0": ("vit_giant_patch14_reg4_dinov2", dict(img_size=224, init_values=1e-5, dynamic_img_size=False,
                                                          num_classes=0, global_pool="token"), HOPT, lambda out: out),
    "h_optimus_1": ("vit_giant_patch14_reg4_dinov2", dict(img_size=224, init_values=1e-5, dynamic_img_size=False,
                                                          num_classes=0, global_pool="token"), HOPT, lambda out: out),
    "gigapath": ("vit_giant_patch14_dinov2", dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40,
                                                  num_heads=24, init_values=1e-5, mlp_ratio=5.33334, num_classes=0),
                 IMAGENET, lambda out: out),
}
# The weight file each publisher distributes (the preset must find it in the folder).
PUBLISHED_FILE = {"uni": "pytorch_model.bin", "uni2_h": "pytorch_model.bin", "virchow2": "model.safetensors",
                  "h_optimus_0": "model.safetensors", "h_optimus_1": "pytorch_model.bin",
                  "gigapath": "pytorch_model.bin"}


@pytest.mark.parametrize("name", list(TIMM_CARDS))
def test_timm_preset_matches_card_recipe(name, tmp_path):
    arch, card, (mean, std), pool = TIMM_CARDS[name]
    ref = seeded(lambda: timm.create_model(arch, pretrained=False, **{**card, "depth": 1}))
    folder = hf_folder(tmp_path / name, ref.state_dict(),
                       {"architecture": arch, "num_classes": 0}, PUBLISHED_FILE[name])

    bb = create_backbone(name, weights=folder, backbone_kwargs={"depth": 1})
    p = PRESETS[name]
    assert (bb.mean, bb.std) == (tuple(mean), tuple(std)) == (p.mean, p.std)
    assert bb.input_size == 224 and bb.preset == name and bb.pooling == p.pooling
    t = tiles(224)
    with torch.inference_mode():
        want = pool(ref(card_input(t, mean, std)))
    got = through_preset(bb, t)
    assert got.shape == (2, p.feature_dim) == (2, bb.feature_dim)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert bb.weights_files == file_hashes([folder / PUBLISHED_FILE[name]])


# --------------------------------------------------------------------------------- transformers presets

def _transformers4_names(state: dict, dinov2: bool) -> dict:
    """Key names as the publishers' checkpoints have them (transformers 4.x modules)."""
    out = {}
    for k, v in state.items():
        k = re.sub(r"^layers\.(\d+)\.", r"encoder.layer.\1.", k)
        for new, old in (("attention.q_proj", "attention.attention.query"),
                         ("attention.k_proj", "attention.attention.key"),
                         ("attention.v_proj", "attention.attention.value"),
                         ("attention.o_proj", "attention.output.dense")):
            k = k.replace(new, old)
        if not dinov2:
            k = k.replace("mlp.fc1", "intermediate.dense").replace("mlp.fc2", "output.dense")
        out[k] = v
    return out


@pytest.mark.parametrize("name", ["phikon", "phikon_v2"])
def test_transformers_preset_matches_card_recipe(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    if name == "phikon":  # card: ViTModel.from_pretrained("owkin/phikon", add_pooling_layer=False)
        config = transformers.ViTConfig(num_hidden_layers=1, image_size=224, patch_size=16, layer_norm_eps=1e-12)
        ref = seeded(lambda: transformers.ViTModel(config, add_pooling_layer=True))  # published with pooler
        published, fname = _transformers4_names(ref.state_dict(), dinov2=False), "pytorch_model.bin"
    else:  # card: AutoModel.from_pretrained("owkin/phikon-v2") -> Dinov2Model
        config = transformers.Dinov2Config(num_hidden_layers=1, hidden_size=1024, num_attention_heads=16,
                                           patch_size=16, image_size=224)
        ref = seeded(lambda: transformers.Dinov2Model(config))
        published, fname = _transformers4_names(ref.state_dict(), dinov2=True), "model.safetensors"
    assert any(".attention.attention.query." in k for k in published)
    folder = hf_folder(tmp_path / name, published, config.to_dict(), fname)

    bb = create_backbone(name, weights=folder)
    assert (bb.mean, bb.std) == IMAGENET and bb.input_size == 224 and bb.pooling == "cls"
    t = tiles(224)
    with torch.inference_mode():
        want = ref(pixel_values=card_input(t, *IMAGENET)).last_hidden_state[:, 0]
    got = through_preset(bb, t)
    assert got.shape == (2, config.hidden_size)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    # a single file (no config.json beside it): the card's config, reduced depth by backbone_kwargs
    single = create_backbone(name, weights=folder / fname, backbone_kwargs={"num_hidden_layers": 1})
    torch.testing.assert_close(through_preset(single, t), want, rtol=1e-4, atol=1e-4)


def test_transformers_preset_rejects_foreign_checkpoint(tmp_path):
    pytest.importorskip("transformers")
    path = tmp_path / "w.safetensors"
    save_file({"blocks.0.norm1.weight": torch.ones(768)}, str(path))
    with pytest.raises(BackboneError, match=r"w\.safetensors.*does not match ViTModel.*missing keys"):
        create_backbone("phikon", weights=path, backbone_kwargs={"num_hidden_layers": 1})


# ----------------------------------------------------------------------------------------------- CONCH

class ConchPooler(nn.Module):
    """CONCH v1's AttentionalPooler as its repository writes it (sequence-first MultiheadAttention)."""

    def __init__(self, d_model, context_dim, n_head=8, n_queries=1):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x):
        x = self.ln_k(x).permute(1, 0, 2)
        q = self.ln_q(self.query).unsqueeze(1).repeat(1, x.shape[1], 1)
        return self.attn(q, x, x, need_weights=False)[0].permute(1, 0, 2)


def test_conch_v1_matches_card_recipe(tmp_path):
    pytest.importorskip("open_clip")
    # CONCH's vision tower: timm ViT-B/16 at 448 px, contrastive attentional pooler (512-d, 8 heads,
    # one query), LayerNorm; encode_image(proj_contrast=False, normalize=False).
    torch.manual_seed(2)
    trunk = timm.models.vision_transformer.VisionTransformer(
        embed_dim=768, depth=1, num_heads=12, mlp_ratio=4, img_size=448, patch_size=16, num_classes=0,
        dynamic_img_size=True).eval()
    pool_c, ln_c = ConchPooler(512, 768).eval(), nn.LayerNorm(512).eval()
    nn.init.normal_(ln_c.weight), nn.init.normal_(ln_c.bias)
    ckpt = {f"visual.trunk.{k}": v for k, v in trunk.state_dict().items()}
    ckpt |= {f"visual.attn_pool_contrast.{k}": v for k, v in pool_c.state_dict().items()}
    ckpt |= {f"visual.ln_contrast.{k}": v for k, v in ln_c.state_dict().items()}
    # the rest of the CoCa checkpoint (captioning pooler, projection, text tower) is not used
    ckpt |= {f"visual.attn_pool_caption.{k}": v for k, v in ConchPooler(768, 768, n_queries=4).state_dict().items()}
    ckpt |= {"visual.proj_contrast": torch.randn(512, 512), "text.token_embedding.weight": torch.randn(8, 768),
             "logit_scale": torch.ones(())}
    folder = tmp_path / "conch"
    folder.mkdir()
    torch.save({"state_dict": ckpt}, folder / "pytorch_model.bin")

    bb = create_backbone("conch_v1", weights=folder, backbone_kwargs={"depth": 1})
    assert (bb.mean, bb.std) == CLIP and bb.input_size == 448 and bb.feature_dim == 512
    t = tiles(448)
    with torch.inference_mode():
        want = ln_c(pool_c(trunk.forward_features(card_input(t, *CLIP)))[:, 0])
    got = through_preset(bb, t)
    assert got.shape == (2, 512)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


class ConchV15Pooler(nn.Module):
    """CONCH v1.5's AttentionalPooler as TRIDENT's conchv1_5.py writes it (einsum attention)."""

    def __init__(self, d_model, context_dim, n_head=8):
        super().__init__()
        self.query, self.heads = nn.Parameter(torch.randn(1, d_model)), n_head
        self.ln_k, self.ln_q = nn.LayerNorm(context_dim), nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, d_model * 2, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x):
        b, h = x.shape[0], self.heads
        q = self.to_q(self.ln_q(self.query)).expand(b, -1, -1)
        k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)
        q, k, v = (t.reshape(b, t.shape[1], h, -1).permute(0, 2, 1, 3) for t in (q, k, v))
        sim = torch.einsum("bhid,bhjd->bhij", q * q.shape[-1] ** -0.5, k)
        attn = (sim - sim.amax(-1, keepdim=True)).softmax(-1)
        out = torch.einsum("bhij,bhjd->bhid", attn, v).permute(0, 2, 1, 3).reshape(b, 1, -1)
        return self.to_out(out)


def test_conch_v1_5_matches_reference_code(tmp_path):
    # TRIDENT conchv1_5: ViT-L/16 trunk built for 224 px (init_values 1.0); at 448 px its 14x14
    # position grid is interpolated on every forward (DINO's bicubic, scale (28 + 0.1) / 14).
    torch.manual_seed(3)
    trunk = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0, init_values=1.0,
                              depth=1).eval()
    pool, ln = ConchV15Pooler(768, 1024).eval(), nn.LayerNorm(768).eval()
    ckpt = {f"trunk.{k}": v for k, v in trunk.state_dict().items()}
    ckpt |= {f"attn_pool_contrast.{k}": v for k, v in pool.state_dict().items()}
    ckpt |= {f"ln_contrast.{k}": v for k, v in ln.state_dict().items()}
    folder = tmp_path / "conchv1_5"
    folder.mkdir()
    torch.save(ckpt, folder / "pytorch_model_vision.bin")
    (folder / "config.json").write_text("{}")

    def reference(x):
        tok = trunk.patch_embed.proj(x).flatten(2).transpose(1, 2)
        pos = trunk.pos_embed[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
        s = 28.1 / 14
        pos = F.interpolate(pos, scale_factor=(s, s), mode="bicubic").permute(0, 2, 3, 1).reshape(1, -1, 1024)
        tok = torch.cat([trunk.cls_token.expand(len(x), -1, -1), tok], 1) + torch.cat([trunk.pos_embed[:, :1], pos], 1)
        tok = trunk.norm(trunk.blocks(tok))
        return ln(pool(tok)[:, 0])

    bb = create_backbone("conch_v1_5", weights=folder, backbone_kwargs={"depth": 1})
    assert (bb.mean, bb.std) == IMAGENET and bb.input_size == 448 and bb.feature_dim == 768
    t = tiles(448)
    with torch.inference_mode():
        want = reference(card_input(t, *IMAGENET))
    torch.testing.assert_close(through_preset(bb, t), want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------- CTransPath

def test_ctranspath_loads_old_timm_swin_layout(tmp_path):
    from slidesnake.encoders import ConvStem

    # the recipe: Swin-T (patch 4, window 7) with the convolutional stem, no head
    ref = seeded(lambda: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0,
                                           embed_layer=ConvStem))
    assert "patch_embed.proj.0.weight" in ref.state_dict() and "patch_embed.proj.6.bias" in ref.state_dict()
    # ctranspath.pth: timm 0.5.4 layout under 'model': patch merging at the END of stage i (today:
    # the start of stage i + 1), relative_position_index and attn_mask buffers stored
    old = {}
    for k, v in ref.state_dict().items():
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        old[k] = v
    for i, depth in enumerate((2, 2, 6, 2)):
        for j in range(depth):
            old[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
            if j % 2:
                old[f"layers.{i}.blocks.{j}.attn_mask"] = torch.zeros(4, 49, 49)
    assert "layers.0.downsample.reduction.weight" in old
    path = tmp_path / "ctranspath.pth"
    torch.save({"model": old}, path)

    bb = create_backbone("ctranspath", weights=path)
    assert (bb.mean, bb.std) == IMAGENET and bb.feature_dim == 768 and bb.pooling == "model"
    t = tiles(224)
    with torch.inference_mode():
        want = ref(card_input(t, *IMAGENET))
    torch.testing.assert_close(through_preset(bb, t), want, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------- full size, shards, sha

@pytest.mark.slow
def test_full_size_uni_loads_on_cpu(tmp_path):
    """UNI at its real size (ViT-L/16, 303M parameters, 1.2 GB file) as MahmoodLab/UNI publishes it."""
    ref = seeded(lambda: timm.create_model("vit_large_patch16_224", pretrained=False, img_size=224, patch_size=16,
                                           init_values=1e-5, num_classes=0, dynamic_img_size=True))
    assert sum(p.numel() for p in ref.parameters()) > 300e6
    folder = hf_folder(tmp_path / "UNI", ref.state_dict(), {"architecture": "vit_large_patch16_224"})
    bb = create_backbone("uni", weights=folder)
    assert bb.feature_dim == 1024 and len(bb.model.model.blocks) == 24
    t = tiles(224, n=1)
    with torch.inference_mode():
        want = ref(card_input(t, *IMAGENET))
    torch.testing.assert_close(through_preset(bb, t), want, rtol=1e-4, atol=1e-4)


def _uni2_small_state(seed=4):
    arch, card, _, _ = TIMM_CARDS["uni2_h"]
    return seeded(lambda: timm.create_model(arch, pretrained=False, **{**card, "depth": 1}), seed)


def test_sharded_folder_and_hf_cache_snapshot(tmp_path):
    ref = _uni2_small_state()
    state = ref.state_dict()
    keys = sorted(state)
    # HF cache layout: models--org--name/{refs/main, snapshots/<rev>/ -> ../../blobs/<sha256>}
    repo = tmp_path / "hub" / "models--MahmoodLab--UNI2-h"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True), blobs.mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    for fname, ks in shards.items():
        tmp = blobs / "tmp"
        save_file({k: state[k].contiguous() for k in ks}, str(tmp))
        blob = blobs / file_hashes([tmp])["tmp"]
        tmp.rename(blob)
        (snap / fname).symlink_to(blob)
    (snap / "model.safetensors.index.json").write_text(json.dumps(index))
    (snap / "config.json").write_text("{}")

    bb = create_backbone("uni2_h", weights=repo, backbone_kwargs={"depth": 1})
    assert sorted(bb.weights_files) == sorted(shards)
    assert bb.weights_sha256 == combined_sha256(bb.weights_files)
    t = tiles(224)
    with torch.inference_mode():
        want = ref(card_input(t, *IMAGENET))
    torch.testing.assert_close(through_preset(bb, t), want, rtol=1e-4, atol=1e-4)

    # a blob whose content no longer matches its name (the hub's LFS sha256) is refused
    blob = (snap / "model-00002-of-00002.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=rf"model-00002-of-00002\.safetensors: sha256 [0-9a-f]{{64}} does not match "
                                           rf"the sha256 the Hugging Face cache names it by.* {blob.name}"):
        create_backbone("uni2_h", weights=repo, backbone_kwargs={"depth": 1})


def test_sha256_pins_and_published_hashes(tmp_path, monkeypatch, caplog):
    path = tmp_path / "pytorch_model.bin"
    torch.save(_uni2_small_state().state_dict(), path)
    sha = file_hashes([path])["pytorch_model.bin"]
    ok = create_backbone("uni2_h", weights=path, backbone_kwargs={"depth": 1}, weights_sha256=sha.upper())
    assert ok.weights_sha256 == sha

    wrong = "0" * 64
    with caplog.at_level(logging.ERROR), pytest.raises(WeightsError) as e:
        create_backbone("uni2_h", weights=path, backbone_kwargs={"depth": 1}, weights_sha256=wrong)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and sha in msg and wrong in msg
    assert sha in caplog.text  # logged (the job's log) before it is raised

    # the publisher's sha256 carried by the preset is checked without any pin
    preset = PRESETS["uni2_h"]
    monkeypatch.setitem(PRESETS, "uni2_h", type(preset)(**{**preset.__dict__, "sha256": {"pytorch_model.bin": wrong}}))
    with pytest.raises(WeightsError, match=rf"pytorch_model\.bin: sha256 {sha} does not match the preset's"):
        create_backbone("uni2_h", weights=path, backbone_kwargs={"depth": 1})


# ------------------------------------------------------------------------------------ escape hatch, errors

def test_timm_escape_hatch_equals_preset(tmp_path):
    """H-optimus-0 without its preset: timm name + backbone_kwargs + mean/std + pooling."""
    arch, card, (mean, std), _ = TIMM_CARDS["h_optimus_0"]
    ref = seeded(lambda: timm.create_model(arch, pretrained=False, **{**card, "depth": 1}))
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    preset = create_backbone("h_optimus_0", weights=path, backbone_kwargs={"depth": 1})
    hatch = create_backbone(f"timm:{arch}", weights=path, mean=list(mean), std=list(std), pooling="cls",
                            backbone_kwargs={"img_size": 224, "init_values": 1e-5, "depth": 1})
    assert hatch.mean == preset.mean and hatch.input_size == 224 and hatch.pooling == "cls"
    t = tiles(224)
    torch.testing.assert_close(through_preset(hatch, t), through_preset(preset, t))
    # Virchow-style pooling of the same model: class token || patch mean without the 4 register tokens
    both = create_backbone(f"timm:{arch}", weights=path, mean=list(mean), std=list(std), pooling="cls+mean",
                           backbone_kwargs={"img_size": 224, "depth": 1})
    x = card_input(t, mean, std)
    with torch.inference_mode():
        tok = ref.forward_features(x)
    assert both.feature_dim == 3072
    torch.testing.assert_close(through_preset(both, t), torch.cat([tok[:, 0], tok[:, 5:].mean(1)], -1),
                               rtol=1e-4, atol=1e-4)


def test_hub_names_refused_and_folder_names_safe():
    for name in ("timm:hf-hub:paige-ai/Virchow2", "timm:hf_hub:MahmoodLab/uni"):
        with pytest.raises(ValueError, match="hub names are refused") as e:
            check_backbone_name(name)
        assert "\n" not in str(e.value)
        with pytest.raises(ValueError, match="hub names are refused"):
            create_backbone(name)
    assert backbone_dirname("timm:vit_small_patch16_224") == "timm-vit_small_patch16_224"
    assert backbone_dirname("timm:org/../x y") == "timm-org-..-x-y"
    assert "/" not in backbone_dirname("../a/b") and not backbone_dirname("../a").startswith(".")
    assert backbone_dirname("uni") == "uni"


def test_missing_package_named(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip -> ImportError
    with pytest.raises(BackboneError, match=r"'conch_v1' needs the Python package 'open_clip_torch'"):
        create_backbone("conch_v1", backbone_kwargs={"depth": 1})


def test_option_errors(tmp_path):
    with pytest.raises(BackboneError, match="takes no features.backbone_kwargs"):
        create_backbone("resnet18_trunc", backbone_kwargs={"depth": 1})
    with pytest.raises(BackboneError, match="has one pooling, attn_pool"):
        create_backbone("conch_v1_5", pooling="cls", backbone_kwargs={"depth": 1})
    with pytest.raises(BackboneError, match="no ImageNet weights.*MahmoodLab/UNI"):
        create_backbone("uni", weights="imagenet")
    with pytest.raises(WeightsError, match="weights file not found"):
        create_backbone("uni", weights=tmp_path / "nowhere")
    with pytest.raises(BackboneError, match="layer class 'Nope'"):
        create_backbone("timm:vit_tiny_patch16_224", backbone_kwargs={"mlp_layer": "Nope"})


def test_preset_table_is_complete():
    assert set(PRESETS) == {"uni", "uni2_h", "virchow2", "h_optimus_0", "h_optimus_1", "phikon", "phikon_v2",
                            "gigapath", "conch_v1", "conch_v1_5", "ctranspath"}
    for p in PRESETS.values():
        assert p.card.startswith("https://") and p.files and p.licence and p.weights_from
        assert len(p.mean) == len(p.std) == 3 and p.feature_dim > 0
    from slidesnake.backbones import list_backbones

    assert set(PRESETS) <= set(list_backbones())
    assert np.isclose(PRESETS["virchow2"].feature_dim, 2 * 1280)
