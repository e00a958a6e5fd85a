"""Backbone registry for tile feature extraction (timm-style: a name selects a builder).

``create_backbone("resnet50_trunc", weights="imagenet")`` returns a :class:`Backbone`: an
``nn.Module`` mapping ``(B, 3, H, W)`` normalised images to ``(B, D)`` features, plus what the
extractor needs (input size, normalisation, compute dtype) and the provenance of its weights.

Weights are never downloaded:

* ``"none"``: seeded random init (tests and the demo only; a warning says so);
* ``"imagenet"``: the checkpoint file torchvision (or timm) would download, looked up in the local
  caches; a missing file is an error naming the file and the directory to put it in;
* a path to ``.pth`` / ``.pt`` / ``.bin`` (a state dict, raw or under ``state_dict`` / ``model``) or
  ``.safetensors``, loaded strictly into the full model before truncation, or into the truncated
  trunk when the keys fit that instead (e.g. a checkpoint saved from a truncated ResNet).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from slidesnake.io import sha256_file  # noqa: F401  (also this module's API)

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


@dataclass
class Backbone:
    """A feature extractor and everything needed to feed it and to record where it came from."""

    model: nn.Module                       # (B, 3, input_size, input_size) -> (B, feature_dim)
    name: str
    feature_dim: int
    input_size: int                        # square side in pixels
    mean: tuple[float, float, float]       # per-channel normalisation of [0, 1] images
    std: tuple[float, float, float]
    weights: str                           # "none", "imagenet:<file>" or the checkpoint path
    weights_sha256: str | None             # sha256 of the weights file; None for random init
    preferred_dtype: torch.dtype = torch.bfloat16  # autocast dtype on CUDA; CPU computes in float32

    def compute_dtype(self, device: torch.device | str) -> torch.dtype:
        return self.preferred_dtype if torch.device(device).type == "cuda" else torch.float32

    def provenance(self) -> dict:
        """Store attributes describing this backbone (JSON-serialisable)."""
        return {"backbone": self.name, "weights": self.weights, "weights_sha256": self.weights_sha256,
                "feature_dim": self.feature_dim, "input_size": self.input_size,
                "mean": list(self.mean), "std": list(self.std)}


@dataclass
class BackboneSpec:
    """What a registered builder returns: the full (loadable) model and how to truncate it."""

    full: nn.Module                        # architecture as published (torchvision/timm keys)
    truncate: Callable[[nn.Module], nn.Module]
    feature_dim: int
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    imagenet_files: list[Path] = field(default_factory=list)  # where cached ImageNet weights may be
    drop_keys: tuple[str, ...] = ()        # checkpoint key prefixes to ignore (a removed head)
    imagenet_hint: str = ""                # said when no ImageNet file is known or found


_REGISTRY: dict[str, Callable[..., BackboneSpec]] = {}


def register_backbone(name: str):
    """Register a builder under ``name``. A name ending in ':' is a family (e.g. ``"timm:"``): its
    builder receives the rest of the requested name (``"timm:vit_small_patch16_224"``)."""

    def deco(fn: Callable[..., BackboneSpec]):
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_backbones() -> list[str]:
    return sorted(n + "<model_name>" if n.endswith(":") else n for n in _REGISTRY)


def create_backbone(name: str, weights: str | Path = "none", seed: int = 0,
                    strip_prefix: str | None = None) -> Backbone:
    """Build backbone ``name`` with ``weights`` ("none", "imagenet" or a checkpoint path)."""
    family, sep, arch = name.partition(":")
    if sep and family + ":" in _REGISTRY:
        builder, args = _REGISTRY[family + ":"], (arch,)
    elif name in _REGISTRY:
        builder, args = _REGISTRY[name], ()
    else:
        raise KeyError(f"unknown backbone {name!r}; known: {', '.join(list_backbones())}")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        spec = builder(*args)

    weights = str(weights)
    if weights == "none":
        log.warning("backbone %s: random weights (seed %d), features are NOT pretrained; "
                    "use this for tests and the demo only", name, seed)
        model, label, sha = spec.truncate(spec.full), "none", None
    else:
        if weights == "imagenet":
            path = _find_imagenet_file(name, spec.imagenet_files, spec.imagenet_hint)
            label = f"imagenet:{path.name}"
        else:
            path = Path(weights).expanduser().resolve()
            label = str(path)
        model, sha = _load_weights(spec, path, strip_prefix), sha256_file(path)
        log.info("backbone %s: loaded %s (sha256 %s)", name, path, sha[:12])
    return Backbone(model=model.eval(), name=name, feature_dim=spec.feature_dim,
                    input_size=spec.input_size, mean=tuple(spec.mean), std=tuple(spec.std),
                    weights=label, weights_sha256=sha)


# ---------------------------------------------------------------------------------------------
# weights



def _hub_checkpoint(url: str) -> Path:
    """Where torch.hub keeps the file downloaded from ``url`` (honours TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _find_imagenet_file(name: str, candidates: list[Path], hint: str = "") -> Path:
    for path in candidates:
        if path.is_file():
            return path
    where = (f"put {candidates[0].name} in {candidates[0].parent}" if candidates
             else "pass weights=<path to a .pth/.safetensors file>")
    hint = f" ({hint})" if hint else ""
    raise FileNotFoundError(f"ImageNet weights for backbone {name!r} not found: {where}{hint}; "
                            "slidesnake never downloads weights")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file: a raw state dict, or one nested under 'state_dict' or 'model'."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"{path}: weights must be one of {', '.join(WEIGHT_SUFFIXES)}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict of tensors (nor one under 'state_dict'/'model')")
    return dict(obj)


def _load_weights(spec: BackboneSpec, path: Path, strip_prefix: str | None) -> nn.Module:
    """Load ``path`` strictly into the full model (then truncate) or else into the trunk."""
    state = read_state_dict(path)
    if strip_prefix:
        state = {k[len(strip_prefix):] if k.startswith(strip_prefix) else k: v for k, v in state.items()}
    if spec.drop_keys:
        state = {k: v for k, v in state.items() if not k.startswith(spec.drop_keys)}

    trunk = spec.truncate(spec.full)  # shares its parameters with spec.full
    attempts = []
    for target, module in (("full model", spec.full), ("truncated trunk", trunk)):
        expected = set(module.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if not missing and not unexpected:
            try:
                module.load_state_dict(state, strict=True)
            except RuntimeError as e:  # same keys, wrong shapes
                first = str(e).strip().splitlines()[1:3]
                raise ValueError(f"{path}: state dict does not fit the {target}: "
                                 f"{' '.join(s.strip() for s in first)}") from None
            return trunk
        attempts.append((len(missing) + len(unexpected), target, missing, unexpected))
    _, target, missing, unexpected = min(attempts, key=lambda a: a[0])
    heads = {k.split(".", 1)[0] for k in state}
    known = {k.split(".", 1)[0] for k in spec.full.state_dict()}
    hint = (f"; every key starts with '{min(heads)}.': set strip_prefix"
            if len(heads) == 1 and heads.isdisjoint(known) else "")
    raise ValueError(f"{path}: state dict does not match the {target}: "
                     f"{len(missing)} missing keys {missing[:3]}, "
                     f"{len(unexpected)} unexpected keys {unexpected[:3]}{hint}")


# ---------------------------------------------------------------------------------------------
# builders


class _Trunk(nn.Module):
    """The named children ``names`` of ``model`` (same parameter names, shared), then ``tail``."""

    def __init__(self, model: nn.Module, names: tuple[str, ...], tail: nn.Module):
        super().__init__()
        self._names = names
        for n in names:
            self.add_module(n, getattr(model, n))
        self.tail = tail  # parameter-free, so it adds no state dict keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for n in self._names:
            x = getattr(self, n)(x)
        return self.tail(x)


def _pool() -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


def _torchvision(ctor, weights_enum, names: tuple[str, ...], feature_dim: int,
                 tail: nn.Module | None = None) -> BackboneSpec:
    return BackboneSpec(
        full=ctor(weights=None),
        truncate=lambda m: _Trunk(m, names, tail if tail is not None else _pool()),
        feature_dim=feature_dim,
        imagenet_files=[_hub_checkpoint(weights_enum.url)],
    )


_RESNET_TO_LAYER3 = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")


@register_backbone("resnet50_trunc")
def _resnet50_trunc() -> BackboneSpec:
    """CLAM's default: ResNet50 (ImageNet V1 weights) up to layer3, average pooled: 1024-d."""
    from torchvision.models import ResNet50_Weights, resnet50

    return _torchvision(resnet50, ResNet50_Weights.IMAGENET1K_V1, _RESNET_TO_LAYER3, 1024)


@register_backbone("resnet18_trunc")
def _resnet18_trunc() -> BackboneSpec:
    """ResNet18 up to layer3, average pooled: 256-d (cheap; CPU tests and the demo)."""
    from torchvision.models import ResNet18_Weights, resnet18

    return _torchvision(resnet18, ResNet18_Weights.IMAGENET1K_V1, _RESNET_TO_LAYER3, 256)


@register_backbone("shufflenet_v2")
def _shufflenet_v2() -> BackboneSpec:
    """ShuffleNet-V2 x1.0 up to conv5, global average pooled: 1024-d."""
    from torchvision.models import ShuffleNet_V2_X1_0_Weights, shufflenet_v2_x1_0

    names = ("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5")
    return _torchvision(shufflenet_v2_x1_0, ShuffleNet_V2_X1_0_Weights.IMAGENET1K_V1, names, 1024)


@register_backbone("densenet121")
def _densenet121() -> BackboneSpec:
    """DenseNet121 features, ReLU, global average pooled: 1024-d."""
    from torchvision.models import DenseNet121_Weights, densenet121

    tail = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    return _torchvision(densenet121, DenseNet121_Weights.IMAGENET1K_V1, ("features",), 1024, tail)


@register_backbone("timm:")
def _timm(arch: str) -> BackboneSpec:
    """Any timm model without its classifier (``num_classes=0``), normalised as timm says."""
    import timm

    if not arch:
        raise KeyError("timm backbones are named 'timm:<model_name>', e.g. 'timm:vit_small_patch16_224'")
    model = timm.create_model(arch, pretrained=False, num_classes=0)
    cfg = timm.data.resolve_model_data_config(model)
    _, h, w = cfg["input_size"]
    if h != w:
        raise ValueError(f"timm:{arch}: non-square input size {h}x{w} is not supported")
    pcfg = model.pretrained_cfg or {}
    files = _hf_cached_files(pcfg["hf_hub_id"]) if pcfg.get("hf_hub_id") else []
    if pcfg.get("url") and not pcfg["url"].endswith(".npz"):  # .npz needs timm's own converter
        files.append(_hub_checkpoint(pcfg["url"]))
    head = pcfg.get("classifier") or ()
    return BackboneSpec(
        full=model, truncate=lambda m: m, feature_dim=int(model.num_features), input_size=int(h),
        mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), imagenet_files=files,
        drop_keys=tuple(f"{c}." for c in ([head] if isinstance(head, str) else head)),
        imagenet_hint=(f"or the Hugging Face repo {pcfg['hf_hub_id']} in the HF cache"
                       if pcfg.get("hf_hub_id") else ""),
    )


def _hf_cached_files(repo_id: str) -> list[Path]:
    """Files of ``repo_id`` already in the Hugging Face cache (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return []
    found = (try_to_load_from_cache(repo_id, f) for f in ("model.safetensors", "pytorch_model.bin"))
    return [Path(p) for p in found if isinstance(p, str)]
