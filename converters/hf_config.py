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
from hdex_jax.activations import ACTIVATIONS
from hdex_jax.config import Activation, eos_ids

CONFIG_JSON = "config.json"

# HF `hidden_act` / `activation_function` names -> ModelConfig.activation.
_HF_ACTIVATIONS: dict[str, Activation] = {
    hf_name: name for name, kind in ACTIVATIONS.items() for hf_name in kind.hf_names}


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
    if name not in _HF_ACTIVATIONS:
        raise CheckpointError(f"{source}: {key}={name!r} is not supported (supported: {sorted(_HF_ACTIVATIONS)})")
    return _HF_ACTIVATIONS[name]


def hf_sizes(hf: Mapping[str, Any], source: str, **given: Any) -> dict[str, Any]:
    """The size and token-id fields of ModelConfig, read from the usual Hugging Face keys, as keyword arguments.

    A field passed in `given` is taken as is and its key is not read, for families that name or size it
    otherwise (`n_embd`, `ffn_dim`, one KV head per query head, ...). The others, in this order:
    vocab_size, hidden_size, num_hidden_layers and num_attention_heads (required), num_key_value_heads
    (default: the query heads), head_dim (default: hidden_size / heads), intermediate_size and
    max_position_embeddings (required), embed_dim (= hidden_size), bos/eos/pad token ids (optional).
    """
    out = dict(given)

    def field(name: str, read: Any) -> None:
        if name not in out:
            out[name] = read()

    field("vocab_size", lambda: int(require(hf, "vocab_size", source)))
    field("hidden_size", lambda: int(require(hf, "hidden_size", source)))
    field("num_layers", lambda: int(require(hf, "num_hidden_layers", source)))
    field("num_heads", lambda: int(require(hf, "num_attention_heads", source)))
    field("num_kv_heads", lambda: int(hf.get("num_key_value_heads") or out["num_heads"]))
    field("head_dim", lambda: int(hf.get("head_dim") or out["hidden_size"] // out["num_heads"]))
    field("intermediate_size", lambda: int(require(hf, "intermediate_size", source)))
    field("max_position_embeddings", lambda: int(require(hf, "max_position_embeddings", source)))
    field("embed_dim", lambda: out["hidden_size"])
    field("bos_token_id", lambda: hf.get("bos_token_id"))
    field("eos_token_ids", lambda: eos_ids(hf.get("eos_token_id")))
    field("pad_token_id", lambda: hf.get("pad_token_id"))
    return out
