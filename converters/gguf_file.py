"""GGUF files (llama.cpp): config from metadata, tensors dequantized to float32, for the architectures declared
in converters/gguf_arches.py (llama, qwen2, qwen3, phi3, gemma, gemma2, gemma3, olmo2, granite, command-r,
starcoder2, gpt2, falcon).

What every architecture shares is read here: sizes, the norm epsilon, rope (theta, linear scaling, rotary
dimension), special token ids, and which optional tensors the file holds (biases, a separate LM head). The
per-architecture facts (fixed fields, tensor names, layout transforms) are declarations in gguf_arches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from converters.errors import CheckpointError, UnsupportedModelError
from converters.gguf_arches import ARCHITECTURES, GGUFMeta
from converters.keymap import Rule
from hdex_jax.config import ModelConfig

__all__ = ["SUPPORTED_ARCHITECTURES", "GGUFSource", "config_from_gguf", "load_gguf", "open_reader"]

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(sorted(ARCHITECTURES))
# Rope scaling kinds (<arch>.rope.scaling.type) the canonical model implements for GGUF.
_ROPE_SCALING_KINDS = ("none", "linear")
# llama.cpp's default when a file leaves rope.freq_base out (gemma, falcon and gpt2-style writers do).
_DEFAULT_ROPE_THETA = 10000.0
# Tensors of rope scaling the canonical model does not implement: per-frequency factors (llama3 scaling) and
# Phi-3's longrope factors.
_REFUSED_TENSORS = {
    "rope_freqs.weight": "per-frequency rope scaling, as llama.cpp writes for llama3 scaling",
    "rope_factors_long.weight": "longrope scaling (Phi-3 128k)",
    "rope_factors_short.weight": "longrope scaling (Phi-3 128k)",
}
# The epsilon key of each norm kind.
_EPS_KEYS = {"rmsnorm": "attention.layer_norm_rms_epsilon", "layernorm": "attention.layer_norm_epsilon"}


def open_reader(path: str | Path) -> gguf.GGUFReader:
    """A GGUFReader over `path`, or a CheckpointError naming the file if it is missing, truncated or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} is missing")
    try:
        # GGUFReader memory-maps the file and views every tensor; a truncated file fails there with a
        # ValueError (reshape of a short view) or an IndexError (header cut short).
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError) as e:
        raise CheckpointError(f"{path} is not a readable GGUF file (truncated or corrupt?): {e}") from e


def _metadata(reader: gguf.GGUFReader, path: Path) -> GGUFMeta:
    """The file's metadata, or UnsupportedModelError for an architecture not declared in gguf_arches."""
    field = reader.get_field("general.architecture")
    if field is None:
        raise CheckpointError(f"{path} has no metadata key 'general.architecture', which a GGUF file needs")
    arch = field.contents()
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} is not supported "
                                    f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    return GGUFMeta(reader, arch, path)


def _rope(meta: GGUFMeta, head_dim: int, permuted: bool) -> dict[str, Any]:
    """theta, linear scaling and the rotary fraction of a rope architecture."""
    rope_dim = int(meta.get("rope.dimension_count") or head_dim)
    if rope_dim != head_dim and permuted:
        raise CheckpointError(f"{meta.path}: {meta.arch}.rope.dimension_count={rope_dim} differs from the head size "
                              f"{head_dim}; partial rotary embeddings are not supported for {meta.arch} GGUF files")
    scaling_kind = meta.get("rope.scaling.type", "none")
    if scaling_kind not in _ROPE_SCALING_KINDS:
        raise CheckpointError(f"{meta.path}: rope scaling type {scaling_kind!r} ({meta.arch}.rope.scaling.type) is "
                              f"not supported (supported: {', '.join(_ROPE_SCALING_KINDS)})")
    scaling: tuple[tuple[str, Any], ...] = ()
    if scaling_kind == "linear":
        scaling = (("factor", float(meta.get("rope.scaling.factor", required=True))), ("rope_type", "linear"))
    return {"rope_theta": float(meta.get("rope.freq_base", _DEFAULT_ROPE_THETA)), "rope_scaling": scaling,
            "partial_rotary_factor": rope_dim / head_dim}


def config_from_gguf(reader: gguf.GGUFReader, path: str | Path) -> ModelConfig:
    """ModelConfig from a GGUF file's metadata and tensor names."""
    meta = _metadata(reader, Path(path))
    arch = ARCHITECTURES[meta.arch]
    for name, what in _REFUSED_TENSORS.items():
        if meta.has(name):
            raise CheckpointError(f"{meta.path} has a {name.removesuffix('.weight')} tensor ({what}), which is not "
                                  f"supported for GGUF")
    hidden = int(meta.get("embedding_length", required=True))
    heads = int(meta.get("attention.head_count", required=True))
    head_dim = int(meta.get("attention.key_length") or hidden // heads)
    fields = dict(arch.fixed)
    if fields["positions"] == "rope":
        fields.update(_rope(meta, head_dim, arch.permuted_qk))
    fields.update(arch.from_file(meta))

    vocab = meta.count("tokenizer.ggml.tokens") or meta.get("vocab_size")
    if vocab is None:
        raise CheckpointError(f"{meta.path} has neither tokenizer.ggml.tokens nor {meta.arch}.vocab_size, so its "
                              f"vocabulary size is unknown")
    eos = meta.general("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        model_type=meta.arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        num_layers=int(meta.get("block_count", required=True)),
        num_heads=heads,
        num_kv_heads=int(meta.get("attention.head_count_kv") or heads),
        head_dim=head_dim,
        intermediate_size=int(meta.get("feed_forward_length", required=True)),
        max_position_embeddings=int(meta.get("context_length", required=True)),
        embed_dim=hidden,
        norm_eps=float(meta.get(_EPS_KEYS[fields["norm"]], required=True)),
        # Which optional tensors exist is not in the metadata; llama.cpp, too, looks at the tensors (of layer 0).
        qkv_bias=meta.has("blk.0.attn_q.bias") or meta.has("blk.0.attn_qkv.bias"),
        o_bias=meta.has("blk.0.attn_output.bias"),
        mlp_bias=meta.has("blk.0.ffn_up.bias") or meta.has("blk.0.ffn_down.bias"),
        lm_head_bias=meta.has("output.bias"),
        # llama.cpp writes no output.weight when the model ties it to the embedding.
        tie_embeddings=not meta.has("output.weight"),
        bos_token_id=meta.general("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
        pad_token_id=meta.general("tokenizer.ggml.padding_token_id"),
        **fields,
    )


class GGUFSource:
    """The tensors of one GGUF file (a keymap.TensorSource), dequantized to float32 on demand."""

    def __init__(self, reader: gguf.GGUFReader, path: str | Path) -> None:
        self._path = Path(path)
        self.checkpoint = str(path)
        self._tensors = {t.name: t for t in reader.tensors}

    def names(self) -> list[str]:
        return list(self._tensors)

    def location(self, name: str) -> str:
        return str(self._path)

    def read(self, name: str) -> np.ndarray:
        tensor = self._tensors[name]
        try:
            # Any type gguf can dequantize is accepted (F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, K- and IQ-quants);
            # for integer tensors and types it has no dequantizer for, gguf answers with NotImplementedError.
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as e:
            raise CheckpointError(f"tensor {name} in {self._path} has GGML type {tensor.tensor_type.name}, which "
                                  f"cannot be dequantized: {e}") from e
        # Copy: the reader's arrays are views into the memory-mapped file.
        return np.array(values, dtype=np.float32)


def load_gguf(path: str | Path) -> tuple[ModelConfig, GGUFSource, list[Rule]]:
    """Config, tensor source and key map of a GGUF file."""
    reader = open_reader(path)
    cfg = config_from_gguf(reader, path)
    return cfg, GGUFSource(reader, path), ARCHITECTURES[cfg.model_type].key_map(cfg)
