"""The workflow's configuration, checked once while the workflow is parsed (STAMP-style).

``workflow/rules/common.smk`` calls :func:`load_config` before anything runs:

1. :func:`schema_errors` -- the JSON schema (``workflow/schemas/config.schema.yaml``: types, ranges,
   unknown keys), reported as one line per problem naming the key and the fix (Snakemake's own
   ``validate`` prints the whole schema after the useful line);
2. typed, frozen section objects built from the validated dict (defaults come from the schema, in
   one place): :class:`FeaturesConfig`, :class:`TrainingConfig`, :class:`SplitsConfig`;
3. cross-field checks that used to fail inside jobs hours later (:func:`check_config`): backbone and
   model names against their registries, the training magnification(s) against the tiled ones, a
   multiscale model with fewer than two magnifications, ``splits.k`` against the patients of each
   class, a sheet with one class.

Every problem is a :class:`ConfigError`: one line, ``config <key>: <problem>; <fix>``.

The registries are read without importing torch (the parser should stay fast, and it runs again in
every cluster job): :func:`registered_names` finds the ``@register_model("name")`` /
``@register_backbone("name")`` decorators in the package's source; a test keeps it equal to
``list_models()`` / ``list_backbones()``.
"""

from __future__ import annotations

import ast
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

_PKG = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A configuration mistake; the message is one line naming the key and the fix."""

    one_line = True

    def __init__(self, key: str, problem: str, fix: str):
        self.key = key
        super().__init__(f"config {key}: {problem}; {fix}")


# ------------------------------------------------------------------------------- schema, one line

def schema_errors(config: Mapping, schema: Mapping) -> list[str]:
    """Every violation of ``schema`` as one line naming the key (``a.b.c``) and the fix."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema)
    out = []
    for err in sorted(cls(schema).iter_errors(config), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(map(str, err.absolute_path))
        if err.validator == "additionalProperties":
            known = sorted((err.schema.get("properties") or {}))
            extra = sorted(set(err.instance) - set(known))
            for key in extra:
                full = f"{where}.{key}" if where else key
                out.append(f"config {full}: unknown key; check its spelling (known keys{' of ' + where if where else ''}: "
                           f"{', '.join(known)}; config/config.yaml documents each)")
            continue
        msg = err.message if len(err.message) < 200 else err.message[:200] + "..."
        out.append(f"config {where or '(top level)'}: {msg}; see config/config.yaml for what it takes")
    return out


def validate_schema(config: Mapping, schema_path: str | os.PathLike) -> None:
    """Raise :class:`ConfigError` with the first violation (all of them, one per line, when several)."""
    import yaml

    schema = yaml.safe_load(Path(schema_path).read_text())
    errors = schema_errors(config, schema)
    if errors:
        err = ConfigError("", "", "")
        err.args = ("\n".join(errors),)
        err.key = errors[0].split(":")[0].removeprefix("config ")
        raise err


# ------------------------------------------------------------------------------- registries

def registered_names(kind: str) -> dict[str, str | None]:
    """Names registered in the package source, without importing it: ``kind`` ``"model"`` -> {name:
    bag_type} (``@register_model``; bag_type from the class body, base default ``"flat"``),
    ``"backbone"`` -> {name: None} (``@register_backbone``; ``"timm:"`` stands for ``timm:<model>``)."""
    files = sorted((_PKG / "models").glob("*.py")) if kind == "model" else [_PKG / "backbones.py"]
    deco = "register_model" if kind == "model" else "register_backbone"
    out: dict[str, str | None] = {}
    if kind == "backbone":  # the foundation-model presets (plain data, no torch)
        from slidesnake.presets import PRESETS

        out.update(dict.fromkeys(PRESETS))
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if not isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                continue
            for d in node.decorator_list:
                if (isinstance(d, ast.Call) and getattr(d.func, "id", getattr(d.func, "attr", None)) == deco
                        and d.args and isinstance(d.args[0], ast.Constant)):
                    bag = None
                    if kind == "model":
                        bag = "flat"
                        for stmt in node.body:
                            targets = ([stmt.target] if isinstance(stmt, ast.AnnAssign) else
                                       stmt.targets if isinstance(stmt, ast.Assign) else [])
                            if any(getattr(t, "id", None) == "bag_type" for t in targets) and \
                                    isinstance(stmt.value, ast.Constant):
                                bag = stmt.value.value
                    out[d.args[0].value] = bag
    return out


# ------------------------------------------------------------------------------- typed sections

@dataclass(frozen=True)
class FeaturesConfig:
    """Section ``features``. Result-defining: backbone, weights, feature_dtype (rule params).
    Run-shaping (read from the config by the job, so changing them reruns nothing): batch_size,
    num_workers, device, compile."""

    backbone: str
    weights: str
    batch_size: Any
    num_workers: Any
    device: str
    compile: bool
    feature_dtype: str

    RUN_SHAPING = ("batch_size", "num_workers", "device", "compile")


@dataclass(frozen=True)
class SplitsConfig:
    k: int
    seed: int
    test_fraction: float


@dataclass(frozen=True)
class TrainingConfig:
    """Section ``training``. Run-shaping: device, tensorboard; everything else defines the model."""

    model: str
    model_kwargs: dict
    magnification: float
    magnifications: list | None
    optimizer: str
    lr: float
    weight_decay: float
    epochs: int
    patience: int
    min_epochs: int
    class_weights: Any
    seed: int
    device: str
    tensorboard: bool

    RUN_SHAPING = ("device", "tensorboard")


def _section(cls, config: Mapping, name: str):
    sec = dict(config.get(name) or {})
    fields = [f for f in cls.__dataclass_fields__]
    return cls(**{f: sec.get(f) for f in fields})


@dataclass(frozen=True)
class Config:
    """The validated configuration: typed sections plus the raw dict for the others."""

    raw: Mapping
    features: FeaturesConfig
    splits: SplitsConfig
    training: TrainingConfig
    tile_magnifications: list[float]
    train_magnifications: list[float]

    @classmethod
    def from_dict(cls, config: Mapping) -> "Config":
        from slidesnake.geometry import parse_targets

        try:
            tiled = [t.magnification for t in parse_targets(config["tiling"]["magnifications"])]
        except ValueError as e:
            raise ConfigError("tiling.magnifications", str(e).rstrip("."), "give each magnification once") from None
        training = _section(TrainingConfig, config, "training")
        return cls(raw=config, features=_section(FeaturesConfig, config, "features"),
                   splits=_section(SplitsConfig, config, "splits"), training=training,
                   tile_magnifications=tiled,
                   train_magnifications=[float(m) for m in (training.magnifications or tiled)])


# ------------------------------------------------------------------------------- cross-field checks

def _close(a: float, values: Sequence[float]) -> bool:
    return any(math.isclose(float(a), float(v)) for v in values)


def _mags(values) -> str:
    return "[" + ", ".join(f"{float(m):g}" for m in values) + "]"


def check_config(cfg: Config, samples: pd.DataFrame | None = None) -> None:
    """The cross-field checks (module docstring); ``samples``: the sample sheet, for the splits."""
    backbones = registered_names("backbone")
    bb = cfg.features.backbone
    family, sep, arch = bb.partition(":")
    if not (bb in backbones or (sep and f"{family}:" in backbones and arch)):
        names = sorted(n + "<model>" if n.endswith(":") else n for n in backbones)
        raise ConfigError("features.backbone", f"unknown backbone {bb!r}",
                          f"use one of {', '.join(names)}")
    models = registered_names("model")
    t = cfg.training
    if t.model not in models:
        raise ConfigError("training.model", f"unknown MIL model {t.model!r}", f"use one of {', '.join(sorted(models))}")
    tiled = cfg.tile_magnifications
    if not _close(t.magnification, tiled):
        raise ConfigError("training.magnification", f"{float(t.magnification):g}x is not tiled "
                          f"(tiling.magnifications gives {_mags(tiled)})",
                          f"set it to one of {_mags(tiled)} or add it to tiling.magnifications")
    missing = [m for m in cfg.train_magnifications if not _close(m, tiled)]
    if missing:
        raise ConfigError("training.magnifications", f"{_mags(missing)} not tiled (tiling.magnifications "
                          f"gives {_mags(tiled)})", "list only tiled magnifications, or add them to tiling.magnifications")
    if models[t.model] == "multiscale" and len(cfg.train_magnifications) < 2:
        raise ConfigError("training.magnifications", f"model {t.model} reads several magnifications but "
                          f"gets {_mags(cfg.train_magnifications)}",
                          "tile at least two (tiling.magnifications, e.g. [5, 10, 20])")
    if samples is not None:
        check_splittable(samples, cfg.raw["classes"], cfg.splits.k, cfg.splits.test_fraction)


def check_splittable(samples: pd.DataFrame, classes: Sequence[str], k: int, test_fraction: float = 0.0,
                     after: str = "") -> None:
    """Two classes with slides, and enough patients in each for ``k`` folds (and a held-out test
    set): :class:`ConfigError` naming ``splits.k`` / ``classes`` and the fix. ``after``: words
    saying which slides were counted (e.g. "after the exclusions")."""
    labels = samples["label"].astype(str)
    present = [c for c in map(str, classes) if (labels == c).any()]
    if len(present) < 2:
        have = present[0] if present else "none"
        raise ConfigError("classes", f"the sample sheet{after} has slides of {'one class only' if present else 'no class'} "
                          f"({have}) of {list(map(str, classes))}",
                          "a classifier needs slides of at least two classes: add slides of the others, "
                          "or fix the 'label' column")
    held_out = round(1 / test_fraction) if test_fraction and test_fraction > 0 else 0
    needed = int(k) + 1 if held_out else int(k)
    per_class = samples.assign(label=labels).groupby("label")["patient_id"].nunique() \
        .reindex([str(c) for c in classes], fill_value=0)
    small = per_class[per_class < needed]
    if len(small):
        counts = ", ".join(f"{c}: {n}" for c, n in per_class.items())
        limit = int(per_class.min()) - (1 if held_out else 0)
        raise ConfigError("splits.k", f"{k} folds{' and a held-out test set' if held_out else ''} need "
                          f"{needed} patients of every class, but {', '.join(small.index)} "
                          f"{'has' if len(small) == 1 else 'have'} fewer{after} (patients per class: {counts})",
                          f"set splits.k to at most {max(limit, 0)}"
                          f"{' or splits.test_fraction: 0' if held_out else ''}, or add patients")


def load_config(config: Mapping, schema_path: str | os.PathLike, samples: pd.DataFrame | None = None) -> Config:
    """Schema (one line per problem), typed sections and cross-field checks, in that order."""
    validate_schema(config, schema_path)
    cfg = Config.from_dict(config)
    check_config(cfg, samples)
    return cfg


def check_coupling_model(model_name: str) -> None:
    """One line refusing a model without an instance-level score (not a flat-bag model). Reads the
    model registry from the package source (slidesnake.config.registered_names): no torch import
    while the workflow is parsed; an unknown name is left to slidesnake.config's check."""
    bag_type = registered_names("model").get(model_name)
    if bag_type not in (None, "flat"):
        raise ValueError(
            f"training.coupling.rounds > 0 needs a flat-bag model with an instance-level score "
            f"(single_instance_logits: abmil, clam, transmil, da_mil); {model_name!r} reads {bag_type!r} "
            "bags, where a tile alone is no bag it can score; set training.coupling.rounds: 0 or another model")
