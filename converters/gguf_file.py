"""GGUF files (llama.cpp): config from metadata, tensors dequantized to float32, for the architectures the families
declare (`Family.gguf`, found through converters/registry.py: llama, qwen2, qwen3, phi3, gemma, gemma2, gemma3,
olmo2, granite, command-r, starcoder2, gpt2, falcon).

What every architecture shares is read here: sizes, the norm epsilon, rope (theta, scaling, rotary dimension),
special token ids, and which optional tensors the file holds (biases, a separate LM head). The per-architecture
facts (fixed fields, tensor names, layout transforms) are each family's `GGUFArch` (converters/gguf_rules.py).

Rope scaling, as llama.cpp's convert_hf_to_gguf.py writes it, becomes the same ModelConfig.rope_scaling the
Hugging Face checkpoint has (hdex_jax/rope.py):

- `rope.scaling.type` linear: `rope.scaling.factor`.
- yarn: `factor`, `original_context_length`, and the optional `yarn_beta_fast`, `yarn_beta_slow` and
  `yarn_attn_factor` (transformers' `attention_factor`, which the convert script writes there).
- longrope (Phi-3 128k, Phi-3.5): the `rope_factors_short` / `rope_factors_long` tensors, `original_context_length`
  and `attn_factor` (the convert script's attention factor).
- a `rope_freqs` tensor (llama3 scaling; the convert script writes no scaling type for it): inverse frequencies
  divided by it, the "freq_factors" kind.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from converters.errors import CheckpointError, UnsupportedModelError
from converters.gguf_rules import GGUFMeta
from converters.keymap import Rule, ignore
from converters.registry import GGUF_ARCHITECTURES
from hdex_jax import quant
from hdex_jax.config import ModelConfig

__all__ = ["SUPPORTED_ARCHITECTURES", "GGUFSource", "config_from_gguf", "load_gguf", "open_reader"]

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(sorted(GGUF_ARCHITECTURES))
# <arch>.rope.scaling.type values read; "none" is no scaling.
_ROPE_SCALING_KINDS = ("none", "linear", "yarn", "longrope")
# llama.cpp's default when a file leaves rope.freq_base out (gemma, falcon and gpt2-style writers do).
_DEFAULT_ROPE_THETA = 10000.0
# The tensors that carry rope scaling; read into the config, not weights.
ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
# Rope scaling metadata with no counterpart in transformers' scalings, refused when set to other than their
# neutral value.
_NEUTRAL_ROPE_KEYS = {"rope.scaling.yarn_ext_factor": (1.0, -1.0), "rope.scaling.yarn_log_multiplier": (0.0,)}
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
    """The file's metadata, or UnsupportedModelError for an architecture no family declares."""
    field = reader.get_field("general.architecture")
    if field is None:
        raise CheckpointError(f"{path} has no metadata key 'general.architecture', which a GGUF file needs")
    arch = field.contents()
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} is not supported "
                                    f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    return GGUFMeta(reader, arch, path)


def _rope_scaling(meta: GGUFMeta) -> tuple[tuple[str, Any], ...]:
    """ModelConfig.rope_scaling of the file's rope scaling metadata and tensors (see the module docstring)."""
    kind = meta.get("rope.scaling.type", "none")
    if kind not in _ROPE_SCALING_KINDS:
        raise CheckpointError(f"{meta.path}: rope scaling type {kind!r} ({meta.arch}.rope.scaling.type) is "
                              f"not supported (supported: {', '.join(_ROPE_SCALING_KINDS)})")
    for key, neutral in _NEUTRAL_ROPE_KEYS.items():
        if meta.get(key, neutral[0]) not in neutral:
            raise CheckpointError(f"{meta.path}: {meta.arch}.{key}={meta.get(key)!r} is not supported (only "
                                  f"{neutral[0]})")
    long = meta.has("rope_factors_long.weight") or meta.has("rope_factors_short.weight")
    if meta.has("rope_freqs.weight"):
        if kind != "none" or long:
            raise CheckpointError(f"{meta.path}: a rope_freqs tensor together with rope scaling {kind!r} "
                                  f"{'and longrope factors ' if long else ''}is not supported")
        return (("factors", tuple(meta.values("rope_freqs.weight").tolist())), ("rope_type", "freq_factors"))
    if kind == "none" and not long:
        return ()
    if kind == "linear":
        return (("factor", float(meta.get("rope.scaling.factor", required=True))), ("rope_type", "linear"))
    scaling: dict[str, Any] = {
        "original_max_position_embeddings": int(meta.get("rope.scaling.original_context_length", required=True))}
    if kind == "yarn":
        scaling.update(rope_type="yarn", factor=float(meta.get("rope.scaling.factor", required=True)))
        for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                          ("yarn_attn_factor", "attention_factor")):
            if meta.get(f"rope.scaling.{key}") is not None:
                scaling[name] = float(meta.get(f"rope.scaling.{key}"))
    else:
        for name in ("rope_factors_short.weight", "rope_factors_long.weight"):
            if not meta.has(name):
                raise CheckpointError(f"{meta.path} has no {name.removesuffix('.weight')} tensor, which longrope "
                                      f"scaling needs")
        scaling.update(rope_type="longrope", short_factor=tuple(meta.values("rope_factors_short.weight").tolist()),
                       long_factor=tuple(meta.values("rope_factors_long.weight").tolist()))
        if meta.get("rope.scaling.attn_factor") is not None:
            scaling["attention_factor"] = float(meta.get("rope.scaling.attn_factor"))
    return tuple(sorted(scaling.items()))


def _rope(meta: GGUFMeta, head_dim: int, permuted: bool) -> dict[str, Any]:
    """theta, scaling and the rotary fraction of a rope architecture."""
    rope_dim = int(meta.get("rope.dimension_count") or head_dim)
    if rope_dim != head_dim and permuted:
        raise CheckpointError(f"{meta.path}: {meta.arch}.rope.dimension_count={rope_dim} differs from the head size "
                              f"{head_dim}; partial rotary embeddings are not supported for {meta.arch} GGUF files")
    return {"rope_theta": float(meta.get("rope.freq_base", _DEFAULT_ROPE_THETA)), "rope_scaling": _rope_scaling(meta),
            "partial_rotary_factor": rope_dim / head_dim}


def config_from_gguf(reader: gguf.GGUFReader, path: str | Path) -> ModelConfig:
    """ModelConfig from a GGUF file's metadata and tensor names."""
    meta = _metadata(reader, Path(path))
    arch = GGUF_ARCHITECTURES[meta.arch]
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

    def stored_format(self, name: str) -> str | None:
        """The `hdex_jax.quant` format a tensor is kept in as stored (Q8_0, Q4_0, Q4_1), or None."""
        return quant.GGUF_KEPT.get(self._tensors[name].tensor_type.name)

    def stored_type(self, name: str) -> str:
        """The tensor's GGML type name (F32, Q4_1, Q6_K, ...)."""
        return self._tensors[name].tensor_type.name

    def read_quantized(self, name: str) -> quant.QuantArray:
        """A tensor of a kept format, its blocks as stored: a QuantArray packed along its last axis (the input
        features of a GGUF matrix [out, in])."""
        tensor = self._tensors[name]
        data = np.asarray(tensor.data)
        fmt = quant.GGUF_KEPT[tensor.tensor_type.name]
        block_bytes = gguf.GGML_QUANT_SIZES[tensor.tensor_type][1]
        shape = (*data.shape[:-1], data.shape[-1] // block_bytes * quant.GROUP)
        return quant.from_gguf_blocks(data, tensor.tensor_type.name, fmt, shape, len(shape) - 1)

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
    rope_rules = [ignore(re.escape(name)) for name in ROPE_TENSORS]  # read into cfg.rope_scaling
    return cfg, GGUFSource(reader, path), GGUF_ARCHITECTURES[cfg.model_type].key_map(cfg) + rope_rules
