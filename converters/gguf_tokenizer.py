"""The tokenizer of a GGUF file, built from its metadata without torch.

A GGUF file has no `tokenizer.json`: llama.cpp stores the vocabulary, merges, token types, special ids and
chat template as metadata. transformers can build the fast tokenizer from them, but its own entry point
(`AutoTokenizer.from_pretrained(..., gguf_file=...)`) reads the metadata with a GGUF reader that imports
torch, which is not a runtime dependency of hdex_jax. So the metadata is read here with the `gguf` package
and handed to transformers' torch-free GGUF-to-fast-tokenizer converter (`convert_gguf_tokenizer`, under the
key names of its `GGUF_TOKENIZER_MAPPING`), which yields the same tokenizer transformers' entry point gives.

    tokenizer = gguf_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")   # a transformers PreTrainedTokenizerFast
    tokenizer.save_pretrained("ckpt/")                              # tokenizer.json, config, chat template
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
from transformers import PreTrainedTokenizerFast
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

from converters.errors import CheckpointError
from converters.gguf_file import open_reader

# The special tokens a GGUF names by id (tokenizer.ggml.<key>), by the tokenizer attribute they become.
_SPECIAL_TOKEN_IDS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def tokenizer_metadata(reader: gguf.GGUFReader, path: str | Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """`(architecture, tokenizer_dict, tokenizer_config)` of a GGUF file, as transformers' converter takes them.

    `tokenizer_dict` holds the vocabulary, merges, token types and special ids under transformers' names;
    `tokenizer_config` the chat template, add_bos/add_eos flags and the special tokens spelled out.
    Raises CheckpointError naming the file when it carries no vocabulary.
    """
    metadata = {name: field.contents() for name, field in reader.fields.items()
                if name.startswith("tokenizer.") or name == "general.architecture"}
    if "tokenizer.ggml.tokens" not in metadata:
        raise CheckpointError(f"{path} has no tokenizer.ggml.tokens, so it carries no tokenizer")
    # GGUF_TOKENIZER_MAPPING maps "tokenizer.<key>" to the names the converter expects, in two groups.
    grouped = {group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items()
                       if f"tokenizer.{key}" in metadata}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":
        # A sentencepiece vocabulary without the flag gets a BOS, as llama.cpp (and transformers) do.
        tokenizer_config.setdefault("add_bos_token", True)
    tokens = tokenizer_dict["tokens"]
    for name, key in _SPECIAL_TOKEN_IDS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokens[token_id] if token_id is not None else None
    return metadata.get("general.architecture", ""), tokenizer_dict, tokenizer_config


def gguf_tokenizer(path: str | Path, **kwargs: Any) -> PreTrainedTokenizerFast:
    """The transformers fast tokenizer described by the metadata of the GGUF file `path` (no torch needed).

    Its tokens equal those of `transformers.AutoTokenizer.from_pretrained(dir, gguf_file=name)`, and it keeps
    the file's chat template, bos/eos/unk/pad tokens and control tokens (as special tokens). `kwargs` (for
    example `padding_side="left"`) override what the file says. Raises CheckpointError for a file without a
    vocabulary or with a tokenizer model transformers cannot build.
    """
    architecture, tokenizer_dict, tokenizer_config = tokenizer_metadata(open_reader(path), path)
    try:
        backend, extra_kwargs = convert_gguf_tokenizer(architecture, tokenizer_dict)
    except ValueError as e:  # a tokenizer.ggml.model transformers has no builder for
        raise CheckpointError(f"cannot build the tokenizer of {path}: {e}") from e
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{"name_or_path": str(path), **tokenizer_config,
                                                                **extra_kwargs, **kwargs})
