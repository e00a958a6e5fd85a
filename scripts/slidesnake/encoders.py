"""Builders of the pathology foundation-model presets (:mod:`slidesnake.presets`) and the pieces they
share: token pooling, layer classes named in plain config values, key conversions from the
published checkpoints, CTransPath's convolutional stem, CONCH's attentional poolers.

Every builder returns a :class:`slidesnake.backbones.BackboneSpec` whose ``full`` module carries
the publisher's parameter names (after ``convert``), so a published checkpoint loads strictly.
Nothing here reaches for a hub: models are built with ``pretrained=False`` from the arguments the
model card gives, weights come from local files (``slidesnake.backbones.create_backbone``).

Written from the sources named in :mod:`slidesnake.presets` (model cards, TRIDENT's encoder
factory, the CONCH and TransPath repositories); no code copied.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from slidesnake.presets import POOLINGS, Preset

__all__ = ["TokenPooling", "ConvStem", "build_timm", "build_preset", "layer_by_name", "CONVERSIONS",
           "require"]


class BackboneError(ValueError):
    """A backbone cannot be built or loaded as configured (one line naming the key and the fix)."""


def require(module: str, package: str, preset: str):
    """Import ``module`` or stop with one line naming the package to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise BackboneError(f"backbone {preset!r} needs the Python package {package!r}, which is not "
                            f"installed: pip install {package} (it is in envs/features.yaml)") from None


# ---------------------------------------------------------------------------------------------
# plain config values -> build arguments


def layer_by_name(name: str):
    """A layer class named in a config (``"SwiGLUPacked"`` -> timm.layers.SwiGLUPacked, ``"SiLU"`` ->
    torch.nn.SiLU)."""
    import timm.layers

    for ns in (timm.layers, nn):
        cls = getattr(ns, str(name), None)
        if callable(cls):  # a class, or a partial of one (timm.layers.SwiGLUPacked)
            return cls
    raise BackboneError(f"backbone_kwargs: no layer class {name!r} in timm.layers or torch.nn")


def build_kwargs(kwargs: Mapping[str, Any]) -> dict:
    """Plain values -> constructor arguments: values of ``*_layer`` keys name layer classes."""
    out = {}
    for k, v in kwargs.items():
        out[k] = layer_by_name(v) if k.endswith("_layer") and isinstance(v, str) else v
    return out


def plain(kwargs: Mapping[str, Any]) -> dict:
    """Constructor arguments -> JSON-able values (classes by name), for the store's provenance."""
    def name(v):
        if callable(v):
            return getattr(v, "__name__", None) or getattr(getattr(v, "func", None), "__name__", repr(v))
        return v

    return {k: name(v) for k, v in kwargs.items()}


# ---------------------------------------------------------------------------------------------
# pooling


class TokenPooling(nn.Module):
    """A ViT (timm ``forward_features`` or a transformers model's ``last_hidden_state``) -> one
    vector per image: ``cls``, ``mean`` (patch tokens), ``cls+mean``, or ``model`` (its own output).

    Prefix tokens (class + register tokens) are never part of the patch mean.
    """

    def __init__(self, model: nn.Module, pooling: str, num_prefix_tokens: int, hf: bool = False):
        super().__init__()
        self.model = model
        self.pooling = pooling
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.hf = hf

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        if self.hf:
            return self.model(pixel_values=x).last_hidden_state
        return self.model.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pooling == "model":
            return self.model(x)
        t = self.tokens(x)
        if self.pooling == "cls":
            return t[:, 0]
        mean = t[:, self.num_prefix_tokens:].mean(1)
        return mean if self.pooling == "mean" else torch.cat([t[:, 0], mean], dim=-1)


def _check_pooling(name: str, pooling: str, has_cls: bool, allowed=tuple(POOLINGS)) -> None:
    if pooling not in allowed:
        raise BackboneError(f"features.pooling {pooling!r} for backbone {name!r}: one of {', '.join(allowed)}")
    if pooling in ("cls", "cls+mean") and not has_cls:
        raise BackboneError(f"features.pooling {pooling!r}: backbone {name!r} has no class token; use mean or model")


# ---------------------------------------------------------------------------------------------
# timm


def build_timm(arch: str, kwargs: Mapping[str, Any], pooling: str | None, name: str):
    """A timm model without classifier (``pretrained=False``, ``num_classes=0``), wrapped for
    ``pooling`` (None: the model's own output). Returns (full, trunk_fn, feature_dim, input_size,
    resolved kwargs)."""
    import timm

    if not arch:
        raise BackboneError("timm backbones are named 'timm:<model_name>', e.g. 'timm:vit_small_patch16_224'")
    kw = build_kwargs(kwargs)
    kw.pop("pretrained", None)
    kw.setdefault("num_classes", 0)
    try:
        model = timm.create_model(arch, pretrained=False, **kw)
    except (TypeError, RuntimeError, ValueError, KeyError) as e:
        raise BackboneError(f"backbone {name!r}: timm.create_model({arch!r}, **{plain(kw)}) failed: "
                            f"{' '.join(str(e).split())}") from None
    pooling = pooling or "model"
    has_cls = getattr(model, "cls_token", None) is not None
    _check_pooling(name, pooling, has_cls)
    if pooling == "model" and getattr(model, "global_pool", None) == "":
        raise BackboneError(f"backbone {name!r}: global_pool '' returns tokens; set features.pooling "
                            "(cls, mean or cls+mean)")
    if pooling != "model" and not hasattr(model, "num_prefix_tokens"):
        raise BackboneError(f"features.pooling {pooling!r}: backbone {name!r} has no tokens (not a ViT); use model")
    dim = int(model.num_features) * (2 if pooling == "cls+mean" else 1)
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        cfg = timm.data.resolve_model_data_config(model)
        size = cfg["input_size"][1:]
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h != w:
        raise BackboneError(f"backbone {name!r}: non-square input size {h}x{w} is not supported")
    prefix = int(getattr(model, "num_prefix_tokens", 0))

    def trunk(m):
        return m if pooling == "model" else TokenPooling(m, pooling, prefix)

    resolved = {**plain(kw), **{k: v for k, v in kwargs.items() if isinstance(v, str)}, "pooling": pooling}
    return model, trunk, dim, int(h), resolved


# ---------------------------------------------------------------------------------------------
# key conversions (published checkpoint -> builder's names); each is f(state, model) -> state


def _convert_conch_v1(state: dict, model: nn.Module) -> dict:
    """CONCH's CoCa checkpoint -> the vision tower used for embeddings: ``visual.trunk.*``,
    ``visual.attn_pool_contrast.*``, ``visual.ln_contrast.*`` (text tower, captioning pooler and
    contrastive projection are not used: encode_image(proj_contrast=False))."""
    keep = ("trunk.", "attn_pool_contrast.", "ln_contrast.")
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    return {k: v for k, v in state.items() if k.startswith(keep)}


def _dino_interpolate(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Patch position embeddings (1, g*g, D) -> (1, grid*grid, D) as DINO/iBOT's
    ``interpolate_pos_encoding`` does it (bicubic, scale factor (grid + 0.1) / g)."""
    g = int(math.isqrt(pos.shape[1]))
    if g == grid:
        return pos
    dim = pos.shape[-1]
    scale = (grid + 0.1) / g
    out = F.interpolate(pos.reshape(1, g, g, dim).permute(0, 3, 1, 2).float(),
                        scale_factor=(scale, scale), mode="bicubic")
    return out.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos.dtype)


def _convert_conch_v1_5(state: dict, model: nn.Module) -> dict:
    """CONCH v1.5 (``pytorch_model_vision.bin``: ``trunk.*``, ``attn_pool_contrast.*``,
    ``ln_contrast.*``). The reference code builds its trunk for 224 px (14x14 grid), resamples a
    checkpoint's position embedding of another grid to it (bilinear), and at 448 px interpolates
    that 14x14 grid to 28x28 on every forward (bicubic, DINO style). The same two steps are done
    once here, for a trunk built at the preset's input size."""
    from timm.layers import resample_abs_pos_embed

    state = dict(state)
    key = "trunk.pos_embed"
    if key in state:
        pos = state[key]
        if pos.shape[1] != 1 + 14 * 14:
            pos = resample_abs_pos_embed(pos, new_size=(14, 14), num_prefix_tokens=1,
                                         interpolation="bilinear", antialias=False, verbose=False)
        grid = model.trunk.patch_embed.grid_size[0]
        state[key] = torch.cat([pos[:, :1], _dino_interpolate(pos[:, 1:], grid)], dim=1)
    return state


def _convert_ctranspath(state: dict, model: nn.Module) -> dict:
    """CTransPath was trained with timm 0.5.4's Swin: patch merging at the end of a stage, relative
    position index and attention masks stored. timm's own Swin filter maps that layout to today's
    (merging at the start of the next stage; buffers dropped); a head, if any, is dropped."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    state = checkpoint_filter_fn(state, model)
    return {k: v for k, v in state.items() if not k.startswith("head.")}


CONVERSIONS: dict[str, Callable[[dict, nn.Module], dict]] = {
    "conch_v1": _convert_conch_v1,
    "conch_v1_5": _convert_conch_v1_5,
    "ctranspath": _convert_ctranspath,
}


# ---------------------------------------------------------------------------------------------
# CTransPath


class ConvStem(nn.Module):
    """CTransPath's patch embedding (Wang et al. 2022): two 3x3 stride-2 conv + BN + ReLU, then a
    1x1 conv to ``embed_dim``; output channels-last ``(B, H/4, W/4, C)`` as timm's Swin expects.
    Parameter names ``proj.0`` ... ``proj.6`` and ``norm`` are the published checkpoint's."""

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None,
                 output_fmt="NHWC", **_):
        super().__init__()
        if patch_size != 4 or embed_dim % 8:
            raise BackboneError("ConvStem needs patch_size 4 and embed_dim divisible by 8")
        img = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size = img
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img[0] // patch_size, img[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers, cin, cout = [], in_chans, embed_dim // 8
        for _ in range(2):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True)]
            cin, cout = cout, cout * 2
        layers.append(nn.Conv2d(cin, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()
        self.output_fmt = output_fmt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).permute(0, 2, 3, 1)  # NCHW -> NHWC
        return self.norm(x)


# ---------------------------------------------------------------------------------------------
# CONCH


class ConchV15Pooler(nn.Module):
    """CONCH v1.5's attentional pooler (TRIDENT ``conchv1_5.AttentionalPooler``): learned queries
    attend to the LayerNorm-ed tokens; bias-free q / kv / out projections."""

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1):
        super().__init__()
        self.heads = n_head
        inner = (d_model // n_head) * n_head
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h = x.shape[0], self.heads
        q = self.to_q(self.ln_q(self.query)).expand(b, -1, -1)
        k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)
        split = lambda t: t.reshape(b, t.shape[1], h, -1).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.to_out(out.transpose(1, 2).reshape(b, -1, out.shape[1] * out.shape[-1]))


class ConchVision(nn.Module):
    """A CONCH vision tower for embeddings: ViT trunk tokens -> contrastive attentional pooler
    (one query) -> LayerNorm (no projection, no normalisation: the card's advice for MIL)."""

    def __init__(self, trunk: nn.Module, pooler: nn.Module, dim: int):
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = pooler
        self.ln_contrast = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_features(x))[:, 0])


# ---------------------------------------------------------------------------------------------
# transformers (Phikon, Phikon-v2)


def _hf_model(preset: Preset, kwargs: dict, config_path: Path | None, files: tuple[Path, ...] | None):
    """A transformers model from the card's config (or the folder's config.json), optionally with
    its published weights loaded by transformers itself (which maps the checkpoint's key names of
    any transformers version to the installed one's). Never reaches for a hub."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers = require("transformers", "transformers", preset.name)
    cls = getattr(transformers, preset.arch)
    config_cls = getattr(transformers, preset.arch.replace("Model", "Config"))
    extra = {"add_pooling_layer": False} if preset.arch == "ViTModel" else {}
    card = {k: v for k, v in preset.kwargs.items()}
    overrides = {k: v for k, v in kwargs.items() if k not in card or card[k] != v}
    if files is None:
        config = config_cls.from_json_file(str(config_path)) if config_path else config_cls(**card)
        for k, v in overrides.items():
            setattr(config, k, v)
        return cls(config, **extra), config
    with tempfile.TemporaryDirectory(prefix="slidesnake-hf-") as tmp:
        folder = Path(files[0]).parent
        if config_path is None or len(files) == 1 and files[0].name not in ("model.safetensors", "pytorch_model.bin"):
            # a single file (or a folder without config.json): a config beside a link to the file
            folder = Path(tmp)
            if config_path:
                shutil.copy(config_path, folder / "config.json")
            else:
                config_cls(**card).to_json_file(str(folder / "config.json"))
            name = "model.safetensors" if files[0].suffix == ".safetensors" else "pytorch_model.bin"
            (folder / name).symlink_to(files[0])
        try:
            model, info = cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True,
                                              **extra, **overrides)
        except (OSError, ValueError, RuntimeError) as e:
            raise BackboneError(f"weights {files[0]}: transformers could not load them as {preset.arch}: "
                                f"{' '.join(str(e).split())[:300]}") from None
    unexpected = sorted(k for k in info["unexpected_keys"] if not k.startswith(("pooler.", "classifier.")))
    bad = sorted(info["missing_keys"]), unexpected, list(info["mismatched_keys"])
    if any(bad):
        raise BackboneError(f"weights {files[0]}: state dict does not match {preset.arch}: "
                            f"{len(bad[0])} missing keys {bad[0][:3]}, {len(bad[1])} unexpected keys "
                            f"{bad[1][:3]}, {len(bad[2])} of wrong shape {bad[2][:3]}")
    return model, model.config


# ---------------------------------------------------------------------------------------------
# presets


def build_preset(preset: Preset, overrides: Mapping[str, Any] | None = None, pooling: str | None = None,
                 config_path: Path | None = None, files: tuple[Path, ...] | None = None) -> dict:
    """Build ``preset`` with ``overrides`` (features.backbone_kwargs) merged over the card's
    arguments. Returns the fields of a BackboneSpec (``full``, ``truncate``, ``feature_dim``,
    ``input_size``, ``convert``, ``resolved``, ``pooling``; ``loaded``: weights already loaded by
    the builder, for the transformers presets)."""
    kwargs = {**preset.kwargs, **dict(overrides or {})}
    pooling = pooling or preset.pooling
    name = preset.name
    convert = CONVERSIONS.get(preset.convert or "")
    if preset.builder == "timm":
        full, trunk, dim, size, resolved = build_timm(preset.arch, kwargs, pooling, name)
        return dict(full=full, truncate=trunk, feature_dim=dim, input_size=size, convert=convert,
                    resolved=resolved, pooling=pooling, loaded=False)
    if preset.builder == "ctranspath":
        kwargs = {**kwargs, "embed_layer": ConvStem}
        full, trunk, dim, size, resolved = build_timm(preset.arch, kwargs, pooling, name)
        resolved["embed_layer"] = "slidesnake.encoders.ConvStem"
        return dict(full=full, truncate=trunk, feature_dim=dim, input_size=size, convert=convert,
                    resolved=resolved, pooling=pooling, loaded=False)
    if preset.builder in ("conch_v1", "conch_v1_5"):
        if pooling != "attn_pool":
            raise BackboneError(f"features.pooling {pooling!r}: backbone {name!r} has one pooling, attn_pool "
                                "(its contrastive attentional pooler)")
        import timm

        dim_out = int(kwargs.pop("embed_dim_contrast"))
        heads = int(kwargs.pop("attn_pooler_heads"))
        trunk_kw = build_kwargs(kwargs)
        trunk = timm.create_model(preset.arch, pretrained=False, num_classes=0, **trunk_kw)
        if preset.builder == "conch_v1":
            open_clip = require("open_clip", "open_clip_torch", name)
            pooler = open_clip.transformer.AttentionalPooler(d_model=dim_out, context_dim=trunk.num_features,
                                                             n_head=heads, n_queries=1)
        else:
            pooler = ConchV15Pooler(dim_out, trunk.num_features, n_head=heads, n_queries=1)
        full = ConchVision(trunk, pooler, dim_out)
        resolved = {**plain(trunk_kw), "embed_dim_contrast": dim_out, "attn_pooler_heads": heads,
                    "pooling": pooling}
        return dict(full=full, truncate=lambda m: m, feature_dim=dim_out,
                    input_size=int(trunk.patch_embed.img_size[0]), convert=convert, resolved=resolved,
                    pooling=pooling, loaded=False)
    if preset.builder in ("transformers_vit", "transformers_dinov2"):
        _check_pooling(name, pooling, True)
        if pooling == "model":
            raise BackboneError(f"features.pooling 'model' for {name!r}: use cls, mean or cls+mean")
        model, config = _hf_model(preset, kwargs, config_path, files)
        prefix = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        size = int(config.image_size)
        dim = int(config.hidden_size) * (2 if pooling == "cls+mean" else 1)
        resolved = {k: getattr(config, k) for k in preset.kwargs if hasattr(config, k)}
        resolved.update({k: v for k, v in kwargs.items() if k not in resolved})
        resolved["pooling"] = pooling
        return dict(full=model, truncate=lambda m: TokenPooling(m, pooling, prefix, hf=True),
                    feature_dim=dim, input_size=size, convert=None, resolved=json.loads(json.dumps(resolved)),
                    pooling=pooling, loaded=files is not None)
    raise BackboneError(f"preset {name!r}: unknown builder {preset.builder!r}")
