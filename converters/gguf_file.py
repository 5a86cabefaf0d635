"""GGUF files (llama.cpp) of architecture "llama": config from metadata, tensors dequantized to float32.

llama.cpp's convert script permutes the rows of q and k so that its rope can rotate adjacent pairs;
the canonical model (like HF) rotates halves, so that permutation is undone here before the usual
llama transforms. Tensors after dequantization are in torch's `[out, in]` layout (GGUF lists dims
innermost first), so the HF llama transforms apply unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from converters.errors import CheckpointError, UnsupportedModelError
from converters.keymap import Rule, compose, keep, kv_in, o_out, q_in, transpose
from hdex_jax.config import ModelConfig

SUPPORTED_ARCHITECTURES = ("llama",)
# Rope scaling kinds (llama.rope.scaling.type) the canonical model implements for GGUF.
_ROPE_SCALING_KINDS = ("none", "linear")
# llama.cpp's default when a file leaves rope.freq_base out.
_DEFAULT_ROPE_THETA = 10000.0


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


def _field(reader: gguf.GGUFReader, key: str, path: Path, default: Any = None, required: bool = False) -> Any:
    field = reader.get_field(key)
    if field is None:
        if required:
            raise CheckpointError(f"{path} has no metadata key {key!r}, which a llama GGUF needs")
        return default
    return field.contents()


def config_from_gguf(reader: gguf.GGUFReader, path: str | Path) -> ModelConfig:
    """ModelConfig from a GGUF file's metadata."""
    path = Path(path)
    arch = _field(reader, "general.architecture", path, required=True)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} is not supported "
                                    f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise CheckpointError(f"{path} has a rope_freqs tensor (per-frequency rope scaling, as llama.cpp writes "
                              f"for llama3 scaling), which is not supported for GGUF")

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        return _field(reader, f"{arch}.{key}", path, default, required)

    hidden = int(get("embedding_length", required=True))
    heads = int(get("attention.head_count", required=True))
    head_dim = int(get("attention.key_length") or hidden // heads)
    rope_dim = int(get("rope.dimension_count") or head_dim)
    if rope_dim != head_dim:
        raise CheckpointError(f"{path}: {arch}.rope.dimension_count={rope_dim} differs from the head size "
                              f"{head_dim}; partial rotary embeddings are not supported for GGUF")

    scaling_kind = get("rope.scaling.type", "none")
    if scaling_kind not in _ROPE_SCALING_KINDS:
        raise CheckpointError(f"{path}: rope scaling type {scaling_kind!r} ({arch}.rope.scaling.type) is not "
                              f"supported (supported: {', '.join(_ROPE_SCALING_KINDS)})")
    scaling: tuple[tuple[str, Any], ...] = ()
    if scaling_kind == "linear":
        scaling = (("factor", float(get("rope.scaling.factor", required=True))), ("rope_type", "linear"))

    tokens = _field(reader, "tokenizer.ggml.tokens", path)
    vocab = len(tokens) if tokens is not None else get("vocab_size")
    if vocab is None:
        raise CheckpointError(f"{path} has neither tokenizer.ggml.tokens nor {arch}.vocab_size, so its vocabulary "
                              f"size is unknown")
    eos = _field(reader, "tokenizer.ggml.eos_token_id", path)
    return ModelConfig(
        model_type=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        num_layers=int(get("block_count", required=True)),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv") or heads),
        head_dim=head_dim,
        intermediate_size=int(get("feed_forward_length", required=True)),
        max_position_embeddings=int(get("context_length", required=True)),
        embed_dim=hidden,
        norm="rmsnorm",
        norm_eps=float(get("attention.layer_norm_rms_epsilon", required=True)),
        positions="rope",
        rope_theta=float(get("rope.freq_base", _DEFAULT_ROPE_THETA)),
        rope_scaling=scaling,
        activation="silu",
        gated_mlp=True,
        # llama.cpp writes no output.weight when the model ties it to the embedding.
        tie_embeddings="output.weight" not in tensor_names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id", path),
        eos_token_ids=() if eos is None else (int(eos),),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id", path),
    )


def unpermute(x: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation.

    llama.cpp writes `w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)`:
    within each head, rows (first half, second half) are interleaved into pairs. This is its inverse.
    """
    return x.reshape(num_heads, x.shape[0] // num_heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _unpermute_q(x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    return unpermute(x, cfg.num_heads)


def _unpermute_k(x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    return unpermute(x, cfg.num_kv_heads)


def key_map(cfg: ModelConfig) -> list[Rule]:
    """GGUF llama tensor names -> canonical names."""
    layer = r"blk\.(?P<layer>\d+)\."
    rules = [
        Rule(r"token_embd\.weight", "embed", keep),
        Rule(layer + r"attn_norm\.weight", "layers/ln1/scale", keep),
        Rule(layer + r"ffn_norm\.weight", "layers/ln2/scale", keep),
        Rule(layer + r"attn_q\.weight", "layers/attn/q/w", compose(_unpermute_q, q_in)),
        Rule(layer + r"attn_k\.weight", "layers/attn/k/w", compose(_unpermute_k, kv_in)),
        Rule(layer + r"attn_v\.weight", "layers/attn/v/w", kv_in),
        Rule(layer + r"attn_output\.weight", "layers/attn/o/w", o_out),
        Rule(layer + r"ffn_gate\.weight", "layers/mlp/gate/w", transpose),
        Rule(layer + r"ffn_up\.weight", "layers/mlp/up/w", transpose),
        Rule(layer + r"ffn_down\.weight", "layers/mlp/down/w", transpose),
        Rule(r"output_norm\.weight", "final_norm/scale", keep),
    ]
    if not cfg.tie_embeddings:
        rules.append(Rule(r"output\.weight", "lm_head/w", transpose))
    return rules


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
    return cfg, GGUFSource(reader, path), key_map(cfg)
