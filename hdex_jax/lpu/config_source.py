"""The model description the performance model needs, from whatever form the user has it in.

`model_config(config)` accepts:

- a `ModelConfig`;
- a dict holding a Hugging Face config.json's contents, or a transformers `PretrainedConfig`;
- a path (str or os.PathLike): a config.json or `hdex_config.json` file, a `.gguf` file, a Hugging Face
  checkpoint directory (holding config.json), a converted checkpoint directory (holding hdex_config.json) or a
  compiled model directory (`$HDEX_HOME/hub/<org>/<name>`, holding ckpt/hdex_config.json);
- a model id: a compiled model's, or a Hub id whose config.json is in the local Hugging Face cache.

Weights are never read or downloaded.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hdex_jax import artifacts, hub
from hdex_jax.config import CONFIG_FILE, ModelConfig
from hdex_jax.validation import check_model_id, quote

ACCEPTED = ("a ModelConfig, a dict of config.json contents, a transformers PretrainedConfig, a path to a "
            "config.json / hdex_config.json / .gguf file or to a model directory, or a model id")


def _from_converters(source: Path | Mapping[str, Any], name: str = "config") -> ModelConfig:
    import converters

    if isinstance(source, Mapping):
        return converters.config_from_hf(dict(source), name)
    return converters.load_config(source)


def _is_pretrained_config(value: Any) -> bool:
    # Only an imported transformers can have made one, so transformers is never imported just to ask.
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(value, transformers.PretrainedConfig)


def _cached_hub_config(model_id: str) -> Path | None:
    """config.json of a Hub id when the local Hugging Face cache has it (no download)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model_id, "config.json")
    return Path(found) if isinstance(found, str) else None


def _from_path(path: Path) -> ModelConfig:
    if path.is_file():
        return ModelConfig.load(path.parent) if path.name == CONFIG_FILE else _from_converters(path)
    for directory in (path, artifacts.ckpt_dir(path)):
        if (directory / CONFIG_FILE).is_file():
            return ModelConfig.load(directory)
    return _from_converters(path)  # a Hugging Face directory; names the missing config.json if there is none


def _from_model_id(model_id: str, name: str) -> ModelConfig:
    ckpt = artifacts.ckpt_dir(hub.model_dir(model_id, name=name))
    if (ckpt / CONFIG_FILE).is_file():
        return ModelConfig.load(ckpt)
    cached = _cached_hub_config(model_id) if "/" in model_id else None
    if cached is not None:
        return _from_converters(cached)
    raise FileNotFoundError(f"no model {model_id!r}: it is neither a file or directory, nor a compiled model "
                            f"({ckpt / CONFIG_FILE}), nor a Hub id whose config.json is in the local Hugging Face "
                            f"cache. Pass a config.json (or its directory) or a .gguf file, or compile the model "
                            f"first.")


def model_config(config: Any, name: str = "config") -> ModelConfig:
    """The `ModelConfig` of `config` (see the module docstring for what it may be).

    Raises TypeError naming `name` for anything else; FileNotFoundError for a path or model id that leads
    nowhere; `converters.UnsupportedModelError` / `CheckpointError` (ValueErrors) for a config that is not of a
    supported family or lacks a key.
    """
    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, Mapping):
        return _from_converters(config, name)
    if _is_pretrained_config(config):
        return _from_converters(config.to_dict(), f"{name} ({type(config).__name__})")
    if isinstance(config, (str, os.PathLike)):
        text = check_model_id(name, config)
        path = Path(text).expanduser()
        if path.exists():
            return _from_path(path)
        return _from_model_id(text, name)
    raise TypeError(f"{name} must be {ACCEPTED}; got {quote(config)} ({type(config).__name__})")


def compiled_format(model: str, name: str = "model") -> tuple[str, str | None] | None:
    """(dtype, quantized format of most of its matrices) of the model `model` (an id or a compiled model
    directory) as it was last compiled, from its newest `param/lpu<N>/` manifest; None if it is not compiled."""
    path = Path(model)
    try:  # a compiled model's own directory, or the one a model id or checkpoint path is compiled into
        model_dir = path if (path / "param").is_dir() else hub.model_dir(model, name=name)
    except (TypeError, ValueError, FileNotFoundError):
        return None
    manifests = [(d.stat().st_mtime, m) for d in sorted((model_dir / "param").glob("lpu*"))
                 if (m := artifacts.current_manifest(d)) is not None and "weight_formats" in m]
    if not manifests:
        return None
    manifest = max(manifests, key=lambda item: item[0])[1]
    formats = [fmt for _, fmt in manifest["weight_formats"]]
    return manifest["dtype"], max(set(formats), key=formats.count) if formats else None
