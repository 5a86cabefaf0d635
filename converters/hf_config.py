"""Reading Hugging Face `config.json` files as plain dicts, with errors that name the key and the file.

The files are read with `json`, not `transformers.AutoConfig`, so that an unknown `model_type` reaches our
registry (and its `UnsupportedModelError`) instead of failing inside transformers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from converters.errors import CheckpointError
from hdex_jax.config import Activation

CONFIG_JSON = "config.json"

# HF `hidden_act` / `activation_function` names -> ModelConfig.activation. "gelu_new" and
# "gelu_pytorch_tanh" are both the tanh approximation of GELU.
_ACTIVATIONS: dict[str, Activation] = {
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The dict in `path` (a `config.json` file, or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_JSON
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a Hugging Face checkpoint needs its {CONFIG_JSON}")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable JSON file: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return config


def require(hf: Mapping[str, Any], key: str, source: str) -> Any:
    """`hf[key]`, or a `CheckpointError` naming the key and the file when it is absent or null."""
    value = hf.get(key)
    if value is None:
        raise CheckpointError(f"{source} has no {key!r}, which model_type {hf.get('model_type')!r} requires")
    return value


def activation(name: str, key: str, source: str) -> Activation:
    """Map an HF activation name to ModelConfig's, or raise naming the key, the value and the file."""
    if name not in _ACTIVATIONS:
        raise CheckpointError(f"{source}: {key}={name!r} is not supported (supported: {sorted(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]
