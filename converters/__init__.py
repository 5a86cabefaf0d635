"""Checkpoint converters: Hugging Face checkpoint directories (safetensors or pytorch_model.bin) and GGUF files
-> canonical hdex_jax params.

    cfg, params = load_checkpoint("path/to/hf_dir")   # or "model.Q8_0.gguf"
    # params: {"embed": [V, E], "layers/attn/q/w": [L, D, H, hd], ...} float32 numpy,
    # exactly the names and shapes of hdex_jax.params.flatten(param_specs(cfg)).

One module per checkpoint family in converters/families/ (llama.py covers llama/mistral/qwen2, ...) declares a config
mapping and a regex key map; keymap.py applies key maps strictly; registry.py dispatches on model_type.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


from converters import gguf_file
from converters.errors import CheckpointError, UnsupportedModelError
from converters.hf_config import CONFIG_JSON, read_config_json
from converters.keymap import TensorSource, convert
from converters.registry import SUPPORTED_MODEL_TYPES, get_converter
from converters.safetensors_files import INDEX_FILE, SINGLE_FILE, SafetensorsSource
from converters.torch_bin import BIN_FILE, BIN_INDEX_FILE, TorchBinSource
from hdex_jax.config import ModelConfig

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "CheckpointError",
    "UnsupportedModelError",
    "config_from_hf",
    "load_checkpoint",
    "load_config",
    "has_tokenizer",
    "load_tokenizer",
    "save_tokenizer",
]

# Files any Hugging Face tokenizer is saved as (fast, sentencepiece, BPE, WordPiece); a directory with none of
# them has no tokenizer, and its model runs on token ids.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "merges.txt", "vocab.txt")


def _is_gguf(path: Path) -> bool:
    return path.suffix.lower() == ".gguf"


def config_from_hf(hf_config: dict[str, Any], source: str = CONFIG_JSON) -> ModelConfig:
    """ModelConfig of a Hugging Face `config.json` dict, dispatched on its `model_type`.

    Raises UnsupportedModelError (listing the supported types) for an unknown model_type and
    CheckpointError naming the key and `source` for a missing required key.
    """
    return get_converter(hf_config.get("model_type"), source).config_from_hf(hf_config, source)


def load_config(path: str | Path) -> ModelConfig:
    """ModelConfig of a Hugging Face checkpoint directory, a `config.json` file, or a `.gguf` file."""
    path = Path(path)
    if _is_gguf(path):
        return gguf_file.config_from_gguf(gguf_file.open_reader(path), path)
    config_path = path / CONFIG_JSON if path.is_dir() else path
    return config_from_hf(read_config_json(config_path), str(config_path))


def _tensor_source(directory: Path) -> TensorSource:
    """The weights of a checkpoint directory: safetensors when it has them (preferred: no pickle to vet at all),
    else pytorch_model.bin read by the restricted reader of converters/torch_bin.py."""
    if (directory / SINGLE_FILE).is_file() or (directory / INDEX_FILE).is_file():
        return SafetensorsSource(directory)
    if (directory / BIN_FILE).is_file() or (directory / BIN_INDEX_FILE).is_file():
        return TorchBinSource(directory)
    found = sorted(p.name for p in directory.iterdir())
    raise CheckpointError(f"{directory} has no weights: expected {SINGLE_FILE}, {INDEX_FILE}, {BIN_FILE} or "
                          f"{BIN_INDEX_FILE}; it holds {', '.join(found) if found else 'nothing'}")


def load_checkpoint(path: str | Path, progress: bool = False) -> tuple[ModelConfig, dict[str, Any]]:
    """Convert a checkpoint to `(ModelConfig, {canonical name: float32 numpy array})`; a GGUF file's Q8_0, Q4_0
    and Q4_1 weights stay as stored, as `hdex_jax.quant.QuantArray` (named in the config's `weight_formats`).

    `path` is a Hugging Face checkpoint directory (config.json + model.safetensors, or shards with
    model.safetensors.index.json; without safetensors, pytorch_model.bin or shards with
    pytorch_model.bin.index.json, read without running pickle code) or a `.gguf` file. The result has
    exactly the weights `param_specs(cfg)` declares. Every checkpoint tensor must be mapped; any unmapped,
    missing or duplicate tensor, a missing, truncated or corrupt file, or a pickle naming anything but tensor
    records raises CheckpointError naming it. `progress=True` shows a tqdm bar.
    """
    path = Path(path)
    if _is_gguf(path):
        cfg, source, rules = gguf_file.load_gguf(path)
    elif path.is_dir():
        config_path = path / CONFIG_JSON
        hf = read_config_json(config_path)
        converter = get_converter(hf.get("model_type"), str(config_path))
        cfg = converter.config_from_hf(hf, str(config_path))
        source, rules = _tensor_source(path), converter.key_map(cfg)
    elif not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    else:
        raise CheckpointError(f"{path} is neither a Hugging Face checkpoint directory nor a .gguf file")
    return convert(source, rules, cfg, progress)


def has_tokenizer(path: str | Path) -> bool:
    """Whether the checkpoint directory or `.gguf` file carries a tokenizer at all."""
    path = Path(path)
    if _is_gguf(path):
        return gguf_file.open_reader(path).get_field("tokenizer.ggml.tokens") is not None
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(path: str | Path, **kwargs: Any) -> Any:
    """The transformers tokenizer of a checkpoint directory or a `.gguf` file, without torch.

    For GGUF it is built from the file's metadata (`converters.gguf_tokenizer`), because transformers' own
    GGUF entry point needs torch; its tokens equal those of that entry point. `kwargs` go to
    `AutoTokenizer.from_pretrained` for a directory and to the tokenizer's constructor for GGUF.
    """
    # Heavy imports (transformers), only needed here.
    from transformers import AutoTokenizer

    from converters.gguf_tokenizer import gguf_tokenizer

    path = Path(path)
    try:
        if _is_gguf(path):
            return gguf_tokenizer(path, **kwargs)
        return AutoTokenizer.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot load a tokenizer from {path}: {e}") from e


def save_tokenizer(path: str | Path, out_dir: str | Path) -> None:
    """Save the tokenizer of a checkpoint directory or a `.gguf` file to `out_dir` in Hugging Face format
    (tokenizer.json, tokenizer_config.json, chat template), loadable with `AutoTokenizer` without torch."""
    load_tokenizer(path).save_pretrained(str(out_dir))
