"""`dataclass`: a frozen dataclass that is a JAX pytree (every field a leaf or subtree) with `.replace(...)`.

What `flax.struct.dataclass` gives, without importing flax: `import flax` imports flax.linen and costs ~0.8 s
of a fresh process's start-up (docs/performance.md, "Start-up").
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import jax

T = TypeVar("T")


def dataclass(cls: type[T]) -> type[T]:
    """Make `cls` a frozen dataclass registered as a pytree whose fields are all data (traced) fields."""
    cls = dataclasses.dataclass(frozen=True)(cls)

    def replace(self: Any, **changes: Any) -> Any:
        return dataclasses.replace(self, **changes)

    cls.replace = replace  # type: ignore[attr-defined]
    names = [field.name for field in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=names, meta_fields=[])
