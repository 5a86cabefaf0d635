"""Sharded checkpoints: an index file (`*.index.json` with a `weight_map`) naming the shard of every tensor."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from converters.errors import CheckpointError


class _InFile(Protocol):
    file: Path


T = TypeVar("T", bound=_InFile)


def read_sharded(index_path: Path, read_shard: Callable[[Path], dict[str, T]], kind: str) -> dict[str, T]:
    """`read_shard` of every shard in the index, checking that the index and the shards agree tensor by tensor:
    no shard missing, no tensor in two shards, none in a shard the index does not name for it, none listed but
    absent. `kind` names the format in messages ("safetensors", "PyTorch checkpoint")."""
    try:
        weight_map: dict[str, Any] = json.loads(index_path.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index_path} is not a valid {kind} index (needs a 'weight_map'): {e}") from e
    found: dict[str, T] = {}
    for file in files:
        path = index_path.parent / file
        if not path.is_file():
            raise CheckpointError(f"shard {path} listed in {index_path} is missing")
        for name, item in read_shard(path).items():
            if name in found:
                raise CheckpointError(f"duplicate tensor {name}: it is in both {found[name].file} and {path}")
            found[name] = item
    for name, item in found.items():
        listed = weight_map.get(name)
        if listed is None or index_path.parent / listed != item.file:
            raise CheckpointError(f"tensor {name} is in {item.file} but {index_path} lists it in {listed!r}")
    for name, file in weight_map.items():
        if name not in found:
            raise CheckpointError(f"tensor {name} is listed in {index_path} but missing from {file}")
    return found
