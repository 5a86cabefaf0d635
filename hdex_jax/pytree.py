"""`dataclass`: a frozen dataclass that is a JAX pytree (every field a leaf or subtree) with `.replace(...)`;
`exportable`: such a pytree that exported programs (`jax.export`) take or return.

What `flax.struct.dataclass` gives, without importing flax: `import flax` imports flax.linen and costs ~0.8 s
of a fresh process's start-up (docs/performance.md, "Start-up").
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import jax
from jax import export

T = TypeVar("T")


def dataclass(cls: type[T]) -> type[T]:
    """Make `cls` a frozen dataclass registered as a pytree whose fields are all data (traced) fields."""
    cls = dataclasses.dataclass(frozen=True)(cls)

    def replace(self: Any, **changes: Any) -> Any:
        return dataclasses.replace(self, **changes)

    cls.replace = replace  # type: ignore[attr-defined]
    names = [field.name for field in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=names, meta_fields=[])


def exportable(cls: type[T]) -> type[T]:
    """Let exported programs take and return `cls`, a `dataclass` above (apply after it): its nodes carry no
    metadata, so nothing is serialized besides the name, "hdex_jax.<class name>", that a load looks it up by."""
    return export.register_pytree_node_serialization(cls, serialized_name=f"hdex_jax.{cls.__name__}",
                                                     serialize_auxdata=lambda aux: b"",
                                                     deserialize_auxdata=lambda data: ())
