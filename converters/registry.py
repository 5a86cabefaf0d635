"""The one registry of the families in the modules of `converters.families`: model_type -> the `Family` that
converts it, and GGUF architecture -> the `GGUFArch` a family declares for it."""

from __future__ import annotations

import importlib
import pkgutil

from converters import families
from converters.errors import UnsupportedModelError
from converters.family import Family
from converters.gguf_rules import GGUFArch


def _discover() -> tuple[dict[str, Family], dict[str, GGUFArch]]:
    found: dict[str, Family] = {}
    architectures: dict[str, GGUFArch] = {}
    for module_info in sorted(pkgutil.iter_modules(families.__path__), key=lambda m: m.name):
        family = getattr(importlib.import_module(f"{families.__name__}.{module_info.name}"), "FAMILY", None)
        if not isinstance(family, Family):
            continue
        for model_type in family.model_types:
            if model_type in found:
                raise RuntimeError(f"model_type {model_type!r} is declared by two families")
            found[model_type] = family
        for arch, form in family.gguf.items():
            if arch in architectures:
                raise RuntimeError(f"GGUF architecture {arch!r} is declared by two families")
            architectures[arch] = form
    return found, architectures


_FAMILIES, GGUF_ARCHITECTURES = _discover()

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_FAMILIES))


def all_families() -> list[Family]:
    """Every family once, in model_type order."""
    return list({id(f): f for f in (_FAMILIES[t] for t in SUPPORTED_MODEL_TYPES)}.values())


def get_converter(model_type: str | None, source: str = "config.json") -> Family:
    """The family of `model_type`, or an UnsupportedModelError listing the supported types."""
    if model_type not in _FAMILIES:
        raise UnsupportedModelError(f"{source}: model_type {model_type!r} is not supported "
                                    f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    return _FAMILIES[model_type]
