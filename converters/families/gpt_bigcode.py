"""GPTBigCode checkpoints (bigcode/starcoder*, santacoder, gpt_bigcode-santacoder, ...): GPT-2's architecture
with multi-query attention, nn.Linear projections and gelu_pytorch_tanh.

`c_attn` is one nn.Linear whose output is laid out in two ways:
- `multi_query=true` (the usual case): [q (H * hd) | k (hd) | v (hd)], a single key/value head;
- `multi_query=false`: per head [q (hd) | k (hd) | v (hd)], i.e. the output axis is [H, 3, hd].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from converters.families.gpt2 import (
    LAYER_NORM_EPS,
    attention_scale,
    gpt_sizes,
    refuse_cross_attention,
)
from converters.families.gpt_neox import split_per_head_qkv
from converters.family import Family
from converters.hf_config import activation, hf_sizes
from converters.keymap import QKV, Rule, keep, linear, lm_head, norm, o_out
from hdex_jax.config import ModelConfig

MODEL_TYPES = ("gpt_bigcode",)


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig of a GPTBigCode `config.json` dict; `source` names the file in errors."""
    refuse_cross_attention(hf, source)
    sizes = gpt_sizes(hf, source)
    # `attention_softmax_in_fp32` and `scale_attention_softmax_in_fp32` only change half-precision numerics.
    return ModelConfig(
        model_type="gpt_bigcode",
        **hf_sizes(hf, source, num_kv_heads=1 if hf.get("multi_query", True) else sizes["num_heads"], **sizes),
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_epsilon", LAYER_NORM_EPS)),
        positions="learned",
        attention_scale=attention_scale(hf),
        activation=activation(hf.get("activation_function", "gelu_pytorch_tanh"), "activation_function", source),
        gated_mlp=False,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def _split_mqa(x: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Multi-query `c_attn` weight `[H*hd + 2*hd, D]` (nn.Linear: [out, in]) or bias `[H*hd + 2*hd]` ->
    q `[D, H, hd]` / `[H, hd]` and k, v `[D, 1, hd]` / `[1, hd]`."""
    q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    if x.shape[0] != q_width + 2 * kv_width:
        raise ValueError(f"the fused q/k/v axis should be {q_width} + 2 * {kv_width} wide")
    x = x.T  # [in, out] (a no-op for the bias)
    q, k, v = np.split(x, [q_width, q_width + kv_width], axis=-1)
    lead = x.shape[:-1]
    return (q.reshape(*lead, cfg.num_heads, cfg.head_dim), k.reshape(*lead, cfg.num_kv_heads, cfg.head_dim),
            v.reshape(*lead, cfg.num_kv_heads, cfg.head_dim))


def key_map(cfg: ModelConfig) -> list[Rule]:
    """HF tensor names of GPTBigCode -> canonical names (`transformer.` prefix optional, as for GPT-2)."""
    top = r"(?:transformer\.)?"
    layer = top + r"h\.(?P<layer>\d+)\."
    # With a single head the two layouts of c_attn coincide.
    split = _split_mqa if cfg.num_kv_heads == 1 else split_per_head_qkv
    return [
        Rule(top + r"wte\.weight", "embed", keep),
        Rule(top + r"wpe\.weight", "pos_embed", keep),
        *norm(layer + r"ln_1", "layers/ln1"),
        *linear(layer + r"attn\.c_attn", QKV, split, split),
        *linear(layer + r"attn\.c_proj", "layers/attn/o", o_out),
        *norm(layer + r"ln_2", "layers/ln2"),
        *linear(layer + r"mlp\.c_fc", "layers/mlp/up"),
        *linear(layer + r"mlp\.c_proj", "layers/mlp/down"),
        *norm(top + r"ln_f", "final_norm"),
        lm_head(cfg),
    ]


FAMILY = Family(
    model_types=MODEL_TYPES,
    example="bigcode/tiny_starcoder_py",
    mechanisms=("learned positions", "LayerNorm", "gelu_pytorch_tanh MLP", "biases",
                "multi-query attention (fused c_attn: all q heads, one k, one v)",
                "multi_query=false (per-head fused c_attn)", "tied LM head"),
    config_from_hf=config_from_hf,
    key_map=key_map,
    limits="add_cross_attention is refused",
)
