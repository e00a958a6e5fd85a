"""Pathology foundation-model presets: what each model card says, as plain data (no torch import).

A preset names an encoder (``features.backbone: uni``) and holds, from its model card and the
publisher's reference code, everything needed to rebuild it offline and feed it: the builder and
its architecture arguments, input size, normalisation, pooling of the output tokens, the output
dimension, and the published weight file names (and their sha256 where the publisher states one).
The builders are in :mod:`slidesnake.encoders`; the format is documented in
docs/features.md ("Adding an encoder").

Sources (read for this table, no code copied): the Hugging Face model cards linked in ``card``;
mahmoodlab/TRIDENT ``trident/patch_encoder_models/load.py`` (encoder factory: timm arguments,
transforms, pooling), mahmoodlab/CONCH ``conch/open_clip_custom`` (CONCH v1 vision tower),
TRIDENT ``model_zoo/conchv1_5/conchv1_5.py`` (CONCH v1.5 vision tower), Xiyue-Wang/TransPath
(CTransPath's ConvStem), timm ``vision_transformer.py`` (``vit_giant_patch14_reg4_dinov2``,
``SwiGLUPacked``, register tokens).

This module is imported while Snakemake parses the workflow: keep it free of torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

# Output pooling of a token-producing encoder (ViT-like): see encoders.TokenPooling.
POOLINGS = {
    "cls": "class token (after the final norm)",
    "cls+mean": "class token concatenated with the mean of the patch tokens (register tokens left out)",
    "mean": "mean of the patch tokens (class and register tokens left out)",
    "model": "the model's own output (timm: its global_pool with the classifier removed)",
}


@dataclass(frozen=True)
class Preset:
    """One encoder as its model card describes it. Every field is plain data (JSON-able)."""

    name: str                     # features.backbone value
    title: str                    # human name and paper
    card: str                     # URL of the model card (the source of the fields below)
    builder: str                  # timm, transformers_vit, transformers_dinov2, conch_v1, conch_v1_5, ctranspath
    arch: str                     # timm model name the card builds (or the transformers class)
    kwargs: dict                  # the card's architecture arguments; layer classes by name ("SwiGLUPacked", "SiLU")
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pooling: str                  # key of POOLINGS, or "attn_pool" (CONCH: the contrastive attentional pooler)
    feature_dim: int
    params: str                   # parameter count of the encoder as built (measured, docs/features.md)
    licence: str                  # as stated on the card when this table was written
    weights_from: str             # where the weights are published
    files: tuple[str, ...]        # published weight file name(s), preferred first
    sha256: dict = field(default_factory=dict)  # file name -> sha256 the publisher states
    convert: str | None = None    # key conversion (encoders.CONVERSIONS) from the published keys
    package: str | None = None    # extra package the builder needs (pip / conda name)
    notes: str = ""


_VIT_TIMM = "timm"

PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset(
        name="uni", title="UNI (Chen et al., Nature Medicine 2024)",
        card="https://huggingface.co/MahmoodLab/UNI", builder=_VIT_TIMM, arch="vit_large_patch16_224",
        kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
        input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="cls", feature_dim=1024,
        params="303M", licence="CC-BY-NC-ND-4.0, gated (access request on Hugging Face)",
        weights_from="huggingface.co/MahmoodLab/UNI: pytorch_model.bin", files=("pytorch_model.bin",),
    ),
    Preset(
        name="uni2_h", title="UNI2-h (MahmoodLab, 2025)",
        card="https://huggingface.co/MahmoodLab/UNI2-h", builder=_VIT_TIMM, arch="vit_giant_patch14_224",
        kwargs={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True,
                "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU", "reg_tokens": 8, "dynamic_img_size": True},
        input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="cls", feature_dim=1536,
        params="681M", licence="CC-BY-NC-ND-4.0, gated",
        weights_from="huggingface.co/MahmoodLab/UNI2-h: pytorch_model.bin", files=("pytorch_model.bin",),
    ),
    Preset(
        name="virchow2", title="Virchow 2 (Zimmermann et al., 2024)",
        card="https://huggingface.co/paige-ai/Virchow2", builder=_VIT_TIMM, arch="vit_huge_patch14_224",
        kwargs={"img_size": 224, "init_values": 1e-5, "reg_tokens": 4, "mlp_ratio": 5.3375,
                "global_pool": "", "dynamic_img_size": True, "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"},
        input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="cls+mean", feature_dim=2560,
        params="631M", licence="CC-BY-NC-ND-4.0, gated",
        weights_from="huggingface.co/paige-ai/Virchow2: model.safetensors / pytorch_model.bin",
        files=("model.safetensors", "pytorch_model.bin"),
        notes="the card's embedding: class token || mean of the 256 patch tokens (the 4 register tokens "
              "left out), 2560-d; pooling: cls gives the 1280-d class token alone",
    ),
    Preset(
        name="h_optimus_0", title="H-optimus-0 (Bioptimus, 2024)",
        card="https://huggingface.co/bioptimus/H-optimus-0", builder=_VIT_TIMM,
        arch="vit_giant_patch14_reg4_dinov2",
        kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False, "global_pool": "token"},
        input_size=224, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, pooling="cls", feature_dim=1536,
        params="1.13B", licence="Apache-2.0 (Hugging Face asks to accept conditions)",
        weights_from="huggingface.co/bioptimus/H-optimus-0: model.safetensors / pytorch_model.bin",
        files=("model.safetensors", "pytorch_model.bin"),
    ),
    Preset(
        name="h_optimus_1", title="H-optimus-1 (Bioptimus, 2025)",
        card="https://huggingface.co/bioptimus/H-optimus-1", builder=_VIT_TIMM,
        arch="vit_giant_patch14_reg4_dinov2",
        kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False, "global_pool": "token"},
        input_size=224, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, pooling="cls", feature_dim=1536,
        params="1.13B", licence="non-commercial licence stated on the card, gated",
        weights_from="huggingface.co/bioptimus/H-optimus-1: model.safetensors / pytorch_model.bin",
        files=("model.safetensors", "pytorch_model.bin"),
    ),
    Preset(
        name="phikon", title="Phikon (Filiot et al., 2023; iBOT ViT-B/16)",
        card="https://huggingface.co/owkin/phikon", builder="transformers_vit", arch="ViTModel",
        kwargs={"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                "intermediate_size": 3072, "image_size": 224, "patch_size": 16, "qkv_bias": True,
                "layer_norm_eps": 1e-12},
        input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="cls", feature_dim=768,
        params="86M", licence="Owkin non-commercial licence (card: 'other'), not gated",
        weights_from="huggingface.co/owkin/phikon: config.json + model.safetensors / pytorch_model.bin",
        files=("model.safetensors", "pytorch_model.bin"), convert="transformers", package="transformers",
        notes="transformers ViTModel(add_pooling_layer=False), last_hidden_state[:, 0]; the folder's "
              "config.json is used when there is one",
    ),
    Preset(
        name="phikon_v2", title="Phikon-v2 (Filiot et al., 2024; DINOv2 ViT-L/16)",
        card="https://huggingface.co/owkin/phikon-v2", builder="transformers_dinov2", arch="Dinov2Model",
        kwargs={"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                "image_size": 224, "patch_size": 16, "mlp_ratio": 4, "layer_norm_eps": 1e-6},
        input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="cls", feature_dim=1024,
        params="303M", licence="Owkin non-commercial licence (card: 'other'), not gated",
        weights_from="huggingface.co/owkin/phikon-v2: config.json + model.safetensors",
        files=("model.safetensors", "pytorch_model.bin"), convert="transformers", package="transformers",
        notes="transformers AutoModel (Dinov2Model), last_hidden_state[:, 0]; the folder's config.json "
              "is used when there is one",
    ),
    Preset(
        name="gigapath", title="Prov-GigaPath tile encoder (Xu et al., Nature 2024)",
        card="https://huggingface.co/prov-gigapath/prov-gigapath", builder=_VIT_TIMM,
        arch="vit_giant_patch14_dinov2",
        kwargs={"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40,
                "num_heads": 24, "init_values": 1e-5, "mlp_ratio": 5.33334},
        input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="cls", feature_dim=1536,
        params="1.13B", licence="Apache-2.0, gated",
        weights_from="huggingface.co/prov-gigapath/prov-gigapath: pytorch_model.bin",
        files=("pytorch_model.bin",),
        notes="the card resizes to 256 (bicubic) and centre-crops 224; slidesnake resizes the whole "
              "tile to 224 (tiles are already the field of view)",
    ),
    Preset(
        name="conch_v1", title="CONCH (Lu et al., Nature Medicine 2024), vision tower",
        card="https://huggingface.co/MahmoodLab/CONCH", builder="conch_v1", arch="vit_base_patch16_224",
        kwargs={"img_size": 448, "patch_size": 16, "embed_dim_contrast": 512, "attn_pooler_heads": 8,
                "dynamic_img_size": True},
        input_size=448, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, pooling="attn_pool", feature_dim=512,
        params="88M", licence="CC-BY-NC-ND-4.0, gated",
        weights_from="huggingface.co/MahmoodLab/CONCH: pytorch_model.bin", files=("pytorch_model.bin",),
        convert="conch_v1", package="open_clip_torch",
        notes="encode_image(proj_contrast=False, normalize=False): the contrastive attentional "
              "pooler's output after its LayerNorm, before the projection (the card's advice for MIL)",
    ),
    Preset(
        name="conch_v1_5", title="CONCH v1.5 (TITAN's patch encoder, Ding et al., 2024)",
        card="https://huggingface.co/MahmoodLab/conchv1_5", builder="conch_v1_5", arch="vit_large_patch16_224",
        kwargs={"img_size": 448, "patch_size": 16, "init_values": 1.0, "embed_dim_contrast": 768,
                "attn_pooler_heads": 8},
        input_size=448, mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="attn_pool", feature_dim=768,
        params="307M", licence="CC-BY-NC-ND-4.0, gated",
        weights_from="huggingface.co/MahmoodLab/conchv1_5: pytorch_model_vision.bin",
        files=("pytorch_model_vision.bin",), convert="conch_v1_5",
        notes="position embedding resampled as the reference code does at 448 px (to the 14x14 grid, "
              "then bicubic to 28x28); output: attentional pooler + LayerNorm, 768-d",
    ),
    Preset(
        name="ctranspath", title="CTransPath (Wang et al., Medical Image Analysis 2022)",
        card="https://github.com/Xiyue-Wang/TransPath", builder="ctranspath",
        arch="swin_tiny_patch4_window7_224", kwargs={"img_size": 224},
        input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="model", feature_dim=768,
        params="28M", licence="GPL-3.0 (code and weights, TransPath repository)",
        weights_from="TransPath README (Google Drive): ctranspath.pth; also CHIEF_CTransPath.pth in "
                     "huggingface.co/datasets/MahmoodLab/hest-bench (gated)",
        files=("ctranspath.pth", "CHIEF_CTransPath.pth"), convert="ctranspath",
        notes="Swin-T with a convolutional stem (ConvStem); the checkpoint's old-timm layout "
              "(downsample at the end of a stage, stored index/mask buffers) is converted",
    ),
]}

_HUB = re.compile(r"(^|:)hf[-_]hub:", re.I)


def check_backbone_name(name: str) -> None:
    """One-line error for names that would reach for a model hub (``timm:hf-hub:org/model``)."""
    if _HUB.search(str(name)):
        raise ValueError(
            f"features.backbone {name!r}: hub names are refused (slidesnake never downloads and never "
            "builds from a hub's config); use a preset (e.g. uni) or timm:<architecture> with "
            "features.backbone_kwargs, and features.weights: <local file or model folder>")


def backbone_dirname(name: str) -> str:
    """Folder name of a backbone's outputs: safe for any name (no '/', no ':', no leading dot).

    ``timm:vit_small_patch16_224`` -> ``timm-vit_small_patch16_224`` (as before); every character
    outside ``[A-Za-z0-9._-]`` becomes ``-``.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]", "-", str(name)).lstrip(".")
    return safe or "backbone"
