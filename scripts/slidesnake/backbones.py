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
  trunk when the keys fit that instead (e.g. a checkpoint saved from a truncated ResNet);
* a Hugging Face model folder or cache snapshot (``config.json`` + safetensors / bin, sharded too;
  :mod:`slidesnake.weightfiles`).

Pathology foundation models are presets (``create_backbone("uni", weights=<folder>)``): the
model card's architecture, input size, normalisation and pooling (:mod:`slidesnake.presets`,
builders in :mod:`slidesnake.encoders`). ``backbone_kwargs``, ``mean``/``std``, ``pooling`` and
``strip_prefix`` adapt a preset or a ``timm:`` model without code; ``weights_sha256`` pins the
weights. Hub names (``timm:hf-hub:...``) are refused: nothing here ever reaches for a hub.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

# Never reach for a model hub, whatever a library would like to do (set before timm / transformers
# / huggingface_hub are imported by a builder).
os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from torch import nn  # noqa: E402

from slidesnake.encoders import BackboneError  # noqa: E402,F401  (also this module's API)
from slidesnake.io import sha256_file  # noqa: E402,F401  (also this module's API)
from slidesnake.presets import PRESETS, check_backbone_name  # noqa: E402
from slidesnake.weightfiles import (  # noqa: E402
    WEIGHT_SUFFIXES,
    WeightFiles,
    WeightsError,  # noqa: F401  (also this module's API)
    combined_sha256,
    file_hashes,
    resolve_weight_files,
    verify_sha256,
)

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    weights_sha256: str | None             # sha256 of the weights file (shards: weightfiles.combined_sha256)
    preferred_dtype: torch.dtype = torch.bfloat16  # autocast dtype on CUDA; CPU computes in float32
    preset: str | None = None              # slidesnake.presets name, None for other backbones
    kwargs: dict = field(default_factory=dict)          # resolved architecture arguments (JSON-able)
    pooling: str | None = None             # how tokens became one vector (presets.POOLINGS, attn_pool)
    weights_files: dict = field(default_factory=dict)   # file name -> sha256 of every weights file
    libraries: dict = field(default_factory=dict)       # versions of the libraries that built it

    def compute_dtype(self, device: torch.device | str) -> torch.dtype:
        return self.preferred_dtype if torch.device(device).type == "cuda" else torch.float32

    def provenance(self) -> dict:
        """Store attributes describing this backbone (JSON-serialisable)."""
        return {"backbone": self.name, "weights": self.weights, "weights_sha256": self.weights_sha256,
                "feature_dim": self.feature_dim, "input_size": self.input_size,
                "mean": list(self.mean), "std": list(self.std),
                "preset": self.preset, "backbone_kwargs": dict(self.kwargs), "pooling": self.pooling,
                "weights_files": dict(self.weights_files), "libraries": dict(self.libraries)}


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
    convert: Callable[[dict, nn.Module], dict] | None = None  # published keys -> the builder's
    resolved: dict = field(default_factory=dict)  # architecture arguments as built (JSON-able)
    pooling: str | None = None
    loaded: bool = False                   # the builder already loaded the weights (transformers)


_REGISTRY: dict[str, Callable[..., BackboneSpec]] = {}
_OPTIONS: set[str] = set()  # builders that take backbone_kwargs / pooling / the weights' files


def register_backbone(name: str, options: bool = False):
    """Register a builder under ``name``. A name ending in ':' is a family (e.g. ``"timm:"``): its
    builder receives the rest of the requested name (``"timm:vit_small_patch16_224"``). With
    ``options`` the builder also receives ``kwargs`` (features.backbone_kwargs), ``pooling`` and
    ``weights`` (the :class:`~slidesnake.weightfiles.WeightFiles`, or None)."""

    def deco(fn: Callable[..., BackboneSpec]):
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = fn
        if options:
            _OPTIONS.add(name)
        return fn

    return deco


def list_backbones() -> list[str]:
    """Every registered name: the fixed backbones, the presets (slidesnake.presets) and families."""
    return sorted(n + "<model_name>" if n.endswith(":") else n for n in _REGISTRY)


def _libraries(preset_package: str | None) -> dict:
    import importlib.metadata as md

    names = ["torch", "torchvision", "timm", "safetensors"] + ([preset_package] if preset_package else [])
    out = {}
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            pass
    return out


def create_backbone(name: str, weights: str | Path = "none", seed: int = 0,
                    strip_prefix: str | None = None, *, backbone_kwargs: Mapping[str, Any] | None = None,
                    mean=None, std=None, pooling: str | None = None,
                    weights_sha256: str | Mapping[str, str] | None = None) -> Backbone:
    """Build backbone ``name`` with ``weights`` ("none", "imagenet", a file or a model folder).

    ``backbone_kwargs`` (plain values; ``*_layer`` values name classes) are merged over a preset's
    card arguments or passed to ``timm.create_model``; ``mean``/``std`` replace the normalisation;
    ``pooling`` one of slidesnake.presets.POOLINGS; ``strip_prefix`` is removed from checkpoint
    keys; ``weights_sha256`` pins the weights (one sha256, or file name -> sha256). Errors are
    logged (one line, in the job's log) before they are raised.
    """
    try:
        return _create_backbone(name, weights, seed, strip_prefix, backbone_kwargs, mean, std, pooling,
                                weights_sha256)
    except (ValueError, KeyError, FileNotFoundError, ImportError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        log.error("backbone %s: %s", name, " ".join(str(msg).split()))
        raise


def _create_backbone(name, weights, seed, strip_prefix, backbone_kwargs, mean, std, pooling,
                     weights_sha256) -> Backbone:
    check_backbone_name(name)
    family, sep, arch = name.partition(":")
    if sep and family + ":" in _REGISTRY:
        key, args = family + ":", (arch,)
    elif name in _REGISTRY:
        key, args = name, ()
    else:
        raise KeyError(f"unknown backbone {name!r}; known: {', '.join(list_backbones())}")
    builder = _REGISTRY[key]
    preset = PRESETS.get(name)
    if key not in _OPTIONS and (backbone_kwargs or pooling):
        raise BackboneError(f"backbone {name!r} takes no features.backbone_kwargs / features.pooling; "
                            "use a preset or timm:<model_name>")

    weights = str(weights)
    files: WeightFiles | None = None
    if weights == "imagenet" and preset is not None:
        raise BackboneError(f"backbone {name!r} has no ImageNet weights: set features.weights to its "
                            f"published weights ({preset.weights_from}; docs/features.md)")
    if weights not in ("none", "imagenet"):
        files = resolve_weight_files(weights, preset.files if preset else ())
    elif weights == "none" and weights_sha256:
        raise BackboneError("features.weights_sha256 is set but features.weights is none (random init)")

    hashes, sha = {}, None
    if files is not None:  # verified before anything reads the file
        hashes = file_hashes(files.files)
        verify_sha256(hashes, files.files, preset.sha256 if preset else None, weights_sha256)
        sha = combined_sha256(hashes)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if key in _OPTIONS:
            spec = builder(*args, kwargs=dict(backbone_kwargs or {}), pooling=pooling, weights=files)
        else:
            spec = builder(*args)

    if weights == "none":
        log.warning("backbone %s: random weights (seed %d), features are NOT pretrained; "
                    "use this for tests and the demo only", name, seed)
        model, label = spec.truncate(spec.full), "none"
    elif weights == "imagenet":
        path = _find_imagenet_file(name, spec.imagenet_files, spec.imagenet_hint)
        label = f"imagenet:{path.name}"
        hashes = file_hashes([path])
        verify_sha256(hashes, [path], None, weights_sha256)
        sha = combined_sha256(hashes)
        _check_hub_name_hash(path, sha)
        model = _load_weights(spec, (path,), strip_prefix, path)
        log.info("backbone %s: loaded %s (sha256 %s)", name, path, sha[:12])
    else:
        label = str(files.given)
        if spec.loaded:
            if strip_prefix:
                raise BackboneError(f"backbone {name!r}: strip_prefix is not used (transformers maps the keys)")
            model = spec.truncate(spec.full)
        else:
            model = _load_weights(spec, files.files, strip_prefix, files.given)
        log.info("backbone %s: loaded %s (%d file(s), sha256 %s)", name, files.given, len(files.files), sha[:12])

    def triple(v, what):
        if v is None:
            return None
        v = tuple(float(x) for x in v)
        if len(v) != 3:
            raise BackboneError(f"features.{what} must have 3 values (R, G, B), got {list(v)}")
        return v

    mean_, std_ = triple(mean, "mean") or tuple(spec.mean), triple(std, "std") or tuple(spec.std)
    return Backbone(model=model.eval(), name=name, feature_dim=spec.feature_dim,
                    input_size=spec.input_size, mean=mean_, std=std_,
                    weights=label, weights_sha256=sha, preset=preset.name if preset else None,
                    kwargs=dict(spec.resolved), pooling=spec.pooling, weights_files=hashes,
                    libraries=_libraries(preset.package if preset else None))


# ---------------------------------------------------------------------------------------------
# weights



def _hub_checkpoint(url: str) -> Path:
    """Where torch.hub keeps the file downloaded from ``url`` (honours TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _check_hub_name_hash(path: Path, sha: str) -> None:
    """torch.hub names a checkpoint ``<name>-<first hex digits of its sha256>.<ext>`` (what
    ``torch.hub.download_url_to_file(check_hash=True)`` verifies): a file whose content does not
    start with that hash is not the published file (e.g. another file saved under its name)."""
    import re

    m = re.search(r"-([0-9a-f]{8,64})\.[A-Za-z]+$", path.name)
    if m and not sha.startswith(m.group(1)):
        raise WeightsError(f"weights {path}: sha256 {sha} does not start with {m.group(1)}, the hash its "
                           "published name carries: this is not the published file (delete it and put the "
                           "real one there)")


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


def _load_weights(spec: BackboneSpec, files, strip_prefix: str | None, path: Path) -> nn.Module:
    """Load ``files`` (one file or the shards of one state dict; ``path``: what the config named)
    strictly into the full model (then truncate) or else into the trunk. The preset's key
    conversion (``spec.convert``) runs after ``strip_prefix``."""
    state = {}
    for f in files:
        state.update(read_state_dict(f))
    if strip_prefix:
        state = {k[len(strip_prefix):] if k.startswith(strip_prefix) else k: v for k, v in state.items()}
    if spec.convert is not None:
        state = spec.convert(state, spec.full)
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


@register_backbone("timm:", options=True)
def _timm(arch: str, kwargs: dict, pooling: str | None, weights: WeightFiles | None) -> BackboneSpec:
    """Any timm model without its classifier (``num_classes=0``) built with ``kwargs``
    (features.backbone_kwargs), pooled by ``pooling`` (default: the model's own), normalised as
    timm says. Never from a hub: ``pretrained=False``, hub names are refused."""
    import timm

    from slidesnake.encoders import build_timm

    model, trunk, dim, size, resolved = build_timm(arch, kwargs, pooling, f"timm:{arch}")
    cfg = timm.data.resolve_model_data_config(model)
    pcfg = model.pretrained_cfg or {}
    files = _hf_cached_files(pcfg["hf_hub_id"]) if pcfg.get("hf_hub_id") else []
    if pcfg.get("url") and not pcfg["url"].endswith(".npz"):  # .npz needs timm's own converter
        files.append(_hub_checkpoint(pcfg["url"]))
    head = pcfg.get("classifier") or ()
    return BackboneSpec(
        full=model, truncate=trunk, feature_dim=dim, input_size=size,
        mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), imagenet_files=files,
        drop_keys=tuple(f"{c}." for c in ([head] if isinstance(head, str) else head)),
        imagenet_hint=(f"or the Hugging Face repo {pcfg['hf_hub_id']} in the HF cache"
                       if pcfg.get("hf_hub_id") else ""),
        resolved=resolved, pooling=resolved.get("pooling"),
    )


def _preset_builder(preset_name: str):
    def build(kwargs: dict, pooling: str | None, weights: WeightFiles | None) -> BackboneSpec:
        from slidesnake.encoders import build_preset

        p = PRESETS[preset_name]
        b = build_preset(p, kwargs, pooling, config_path=weights.config if weights else None,
                         files=weights.files if weights else None)
        return BackboneSpec(full=b["full"], truncate=b["truncate"], feature_dim=b["feature_dim"],
                            input_size=b["input_size"], mean=tuple(p.mean), std=tuple(p.std),
                            convert=b["convert"], resolved=b["resolved"], pooling=b["pooling"],
                            loaded=b["loaded"])

    build.__doc__ = f"{PRESETS[preset_name].title}: {PRESETS[preset_name].card}"
    return build


for _name in PRESETS:
    register_backbone(_name, options=True)(_preset_builder(_name))


def _hf_cached_files(repo_id: str) -> list[Path]:
    """Files of ``repo_id`` already in the Hugging Face cache (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return []
    found = (try_to_load_from_cache(repo_id, f) for f in ("model.safetensors", "pytorch_model.bin"))
    return [Path(p) for p in found if isinstance(p, str)]
