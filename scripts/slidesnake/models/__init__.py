"""MIL model registry.

Every model lives in its own module of this package, subclasses :class:`MILModel` and registers
itself with ``@register_model("name")``. Modules are imported when the package is imported, so a
new model only needs a new file here.

    >>> model = create_model("abmil", in_dim=1024, n_classes=2, hidden=256)
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Callable, TypeVar

from slidesnake.models.base import MILModel, MILOutput

__all__ = ["MILModel", "MILOutput", "register_model", "create_model", "list_models", "get_model_class"]

_REGISTRY: dict[str, type[MILModel]] = {}
_NOT_MODELS = {"base", "layers"}
M = TypeVar("M", bound=type[MILModel])


def register_model(name: str) -> Callable[[M], M]:
    """Class decorator: make ``cls`` available as ``create_model(name, ...)``."""

    def deco(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, MILModel)):
            raise TypeError(f"register_model({name!r}): {cls!r} is not a MILModel subclass")
        other = _REGISTRY.get(name)
        if other is not None and other.__qualname__ != cls.__qualname__:
            raise ValueError(f"MIL model name {name!r} already registered by {other.__module__}.{other.__qualname__}")
        _REGISTRY[name] = cls
        cls.model_name = name
        return cls

    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model_class(name: str) -> type[MILModel]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown MIL model {name!r}; known models: {', '.join(list_models())}") from None


def create_model(name: str, in_dim: int, n_classes: int, **kwargs) -> MILModel:
    """Build a registered model for bags of ``in_dim``-dimensional instances."""
    cls = get_model_class(name)
    sig = inspect.signature(cls.__init__)
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    allowed = [p for p in sig.parameters if p not in ("self", "in_dim", "n_classes")]
    unknown = [k for k in kwargs if k not in allowed]
    if unknown and not has_var_kw:
        raise TypeError(f"model {name!r} got unknown option(s) {unknown}; accepted: {allowed}")
    return cls(int(in_dim), int(n_classes), **kwargs)


def _import_model_modules() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _NOT_MODELS and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_model_modules()
