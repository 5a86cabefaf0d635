"""BLOOM checkpoints (bigscience/bloom*, bloomz*): ALiBi, a LayerNorm on the embeddings, one fused per-head
`query_key_value`, tanh-GELU MLP, biases everywhere, LM head tied to the embeddings.

ALiBi: transformers adds `slope_h * j` to the scores of key position j (positions count only the row's real
tokens); the canonical model adds `slope_h * (j - i)` for query position i, which differs by a constant per
query row and so gives the same softmax. The slopes are not stored in the checkpoint; they are derived here
exactly as transformers' `build_alibi_tensor` computes them, non-power-of-two head counts included.

The fused `query_key_value` is per-head interleaved: its output features are `[H, 3, hd]` (q, k, v of head 0,
then of head 1, ...). `grouped_qkv` splits it; Falcon's three fused layouts are the same grouping with other
head counts and reuse it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from converters.errors import CheckpointError
from converters.family import Family
from converters.hf_config import hf_sizes, require
from converters.keymap import QKV, Derived, Rule, keep, linear, lm_head, norm, o_out
from hdex_jax.config import ModelConfig

MODEL_TYPES = ("bloom",)

# BLOOM was trained with 2048-token sequences; its config.json records no position limit because ALiBi has no
# position table, so this is the context hdex_jax offers unless the config says otherwise.
DEFAULT_CONTEXT = 2048


def bloom_alibi_slopes(num_heads: int) -> np.ndarray:
    """The ALiBi slope of each head, `[num_heads]` float32, as transformers' BLOOM (and Falcon) compute them.

    For a power-of-two head count n the slopes are the geometric sequence `2^(-8/n) ** (1..n)`; otherwise the
    largest power of two below n gets that sequence and the remaining heads take every other term of the
    sequence for twice as many heads (the ALiBi paper's recipe). Computed in float32 like transformers.
    """
    closest = 2 ** math.floor(math.log2(num_heads))
    base = np.float32(2 ** (-(2 ** -(math.log2(closest) - 3))))
    slopes = np.power(base, np.arange(1, 1 + closest, dtype=np.float32))
    if closest != num_heads:
        extra_base = np.float32(2 ** (-(2 ** -(math.log2(2 * closest) - 3))))
        remaining = min(closest, num_heads - closest)
        extra = np.power(extra_base, np.arange(1, 1 + 2 * remaining, 2, dtype=np.float32))
        slopes = np.concatenate([slopes, extra])
    return slopes.astype(np.float32)


def _groups(cfg: ModelConfig) -> tuple[int, int]:
    """(KV heads, query heads per KV head) of the fused layout."""
    return cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads


def grouped_qkv(x: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A fused q/k/v weight `[KV * (G + 2) * hd, D]` whose output features are grouped `[KV, G + 2, hd]`: for
    each KV head, its G query heads, then its key, then its value -> q `[D, H, hd]`, k and v `[D, KV, hd]`.

    With KV = H (G = 1) this is BLOOM's and classic Falcon's per-head interleaved `[H, 3, hd]`; with KV = 1
    Falcon-7B's multi-query `[H q | k | v]`; otherwise Falcon-40B's grouped layout. Query head `kv * G + g`
    reads KV head `kv`, which is the canonical model's grouped-query order.
    """
    kv, g = _groups(cfg)
    w = x.reshape(kv, g + 2, cfg.head_dim, x.shape[1])
    q = w[:, :g].reshape(cfg.num_heads, cfg.head_dim, -1).transpose(2, 0, 1)
    return q, w[:, g].transpose(2, 0, 1), w[:, g + 1].transpose(2, 0, 1)


def grouped_qkv_bias(x: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The bias of `grouped_qkv`'s weight: `[KV * (G + 2) * hd]` -> q `[H, hd]`, k and v `[KV, hd]`."""
    kv, g = _groups(cfg)
    b = x.reshape(kv, g + 2, cfg.head_dim)
    return b[:, :g].reshape(cfg.num_heads, cfg.head_dim), b[:, g], b[:, g + 1]


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig of a BLOOM `config.json` dict; `source` names the file in errors.

    Old Hub files name the sizes `n_embed` and `num_attention_heads`, files saved by transformers `hidden_size`
    and `n_head`; both are read.
    """
    if hf.get("apply_residual_connection_post_layernorm"):
        # The residual would be the normalized input instead of the input; the canonical block has no such form.
        raise CheckpointError(f"{source}: apply_residual_connection_post_layernorm=true is not supported")
    hidden = int(hf.get("hidden_size") or require(hf, "n_embed", source))
    heads = int(hf.get("n_head") or require(hf, "num_attention_heads", source))
    if hidden % heads:
        raise CheckpointError(f"{source}: hidden size {hidden} is not a multiple of the {heads} heads")
    return ModelConfig(
        model_type="bloom",
        # BloomMLP is always 4x wide; config.json has no key for it.
        **hf_sizes(hf, source, hidden_size=hidden, num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
                   num_layers=int(hf.get("n_layer") or require(hf, "num_hidden_layers", source)),
                   intermediate_size=4 * hidden,
                   max_position_embeddings=int(hf.get("max_position_embeddings") or hf.get("seq_length")
                                               or DEFAULT_CONTEXT)),
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        embed_norm=True,
        positions="alibi",
        # bloom_gelu_forward is the tanh approximation.
        activation="gelu_tanh",
        gated_mlp=False,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def key_map(cfg: ModelConfig) -> list[Rule | Derived]:
    """HF tensor names of BLOOM -> canonical names. The `transformer.` prefix is optional: the bigscience
    files were saved from BloomModel ("h.0.…"), newer ones from BloomForCausalLM ("transformer.h.0.…")."""
    top = r"(?:transformer\.)?"
    layer = top + r"h\.(?P<layer>\d+)\."
    return [
        Rule(top + r"word_embeddings\.weight", "embed", keep),
        *norm(top + r"word_embeddings_layernorm", "embed_norm"),
        *norm(layer + r"input_layernorm", "layers/ln1"),
        *linear(layer + r"self_attention\.query_key_value", QKV, grouped_qkv, grouped_qkv_bias),
        *linear(layer + r"self_attention\.dense", "layers/attn/o", o_out),
        *norm(layer + r"post_attention_layernorm", "layers/ln2"),
        *linear(layer + r"mlp\.dense_h_to_4h", "layers/mlp/up"),
        *linear(layer + r"mlp\.dense_4h_to_h", "layers/mlp/down"),
        *norm(top + r"ln_f", "final_norm"),
        Derived("alibi_slopes", lambda c: bloom_alibi_slopes(c.num_heads)),
        lm_head(cfg),
    ]


FAMILY = Family(
    model_types=MODEL_TYPES,
    example="bigscience/bloom-560m",
    mechanisms=("ALiBi", "LayerNorm on the embeddings", "fused per-head q/k/v", "tanh-GELU MLP", "biases",
                "tied LM head"),
    config_from_hf=config_from_hf,
    key_map=key_map,
    limits="apply_residual_connection_post_layernorm=true is refused",
)
