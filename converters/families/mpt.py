"""MPT checkpoints (mosaicml/mpt-*): ALiBi with MPT's own slopes, a fused `Wqkv`, LayerNorms without bias,
an exact-GELU MLP without biases, LM head tied to the embeddings.

ALiBi: transformers adds `slope_h * (j - last)` to the score of key position j (positions in the padded
sequence); the canonical model adds `slope_h * (j - i)` for query position i: per query row the two differ by
a constant, so the softmax is the same. MPT's slopes (`alibi_bias_max`, and for a non-power-of-two head count
the odd terms of the next power's sequence, then the even ones) are derived here exactly as transformers'
`build_mpt_alibi_tensor` computes them.

What transformers' MptModel does not implement (it ignores these options, so a checkpoint that sets them
would convert and run wrong) is refused: clip_qkv, qk_ln, a prefix LM, multi-query attention, learned
positions instead of ALiBi, logit_scale and linear/norm biases (`no_bias=false`). So is an alibi_bias_max
other than 8, which transformers does not read either (it always builds the slopes with 8).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from converters.errors import CheckpointError
from converters.family import Family
from converters.hf_config import hf_sizes, require
from converters.keymap import Derived, Rule, keep, lm_head, o_out, transpose
from hdex_jax.config import ModelConfig

MODEL_TYPES = ("mpt",)

# MptAttentionConfig's default, and the value of every MPT release.
DEFAULT_ALIBI_BIAS_MAX = 8
# Both names MPT configs use for its (single) LayerNorm implementation; in float32 they are the same.
_NORM_TYPES = ("layernorm", "low_precision_layernorm")


def mpt_alibi_slopes(num_heads: int, alibi_bias_max: float = DEFAULT_ALIBI_BIAS_MAX) -> np.ndarray:
    """The ALiBi slope of each head, `[num_heads]` float32, as transformers' `build_mpt_alibi_tensor` computes.

    With n the next power of two of `num_heads`, slope k (1-based) is `2^-(k * alibi_bias_max / n)`; when n is
    larger than `num_heads` the heads take the odd-indexed slopes first, then the even-indexed ones.
    """
    padded = 2 ** math.ceil(math.log2(num_heads))
    base = np.arange(1, padded + 1, dtype=np.float32) * np.float32(alibi_bias_max / padded)
    slopes = np.float32(1.0) / np.power(np.float32(2.0), base)
    if padded != num_heads:
        slopes = np.concatenate([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes.astype(np.float32)


def _attn_config(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    """`attn_config`, checked for what the canonical model implements."""
    attn = dict(hf.get("attn_config") or {})
    refused = {
        "clip_qkv": bool(attn.get("clip_qkv")),
        "qk_ln": bool(attn.get("qk_ln")),
        "prefix_lm": bool(attn.get("prefix_lm")),
        "alibi": not attn.get("alibi", True),
        "attn_type": attn.get("attn_type", "multihead_attention") != "multihead_attention",
        # transformers always builds the slopes with 8 (every MPT release uses 8), and the slopes are derived
        # from the ModelConfig, which does not carry it.
        "alibi_bias_max": attn.get("alibi_bias_max", DEFAULT_ALIBI_BIAS_MAX) != DEFAULT_ALIBI_BIAS_MAX,
    }
    for key, bad in refused.items():
        if bad:
            raise CheckpointError(f"{source}: attn_config.{key}={attn[key]!r} is not supported (supported: "
                                  f"clip_qkv null, qk_ln false, prefix_lm false, alibi true, attn_type "
                                  f"'multihead_attention', alibi_bias_max {DEFAULT_ALIBI_BIAS_MAX})")
    return attn


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig of an MPT `config.json` dict; `source` names the file in errors."""
    attn = _attn_config(hf, source)
    if not hf.get("no_bias", True):
        raise CheckpointError(f"{source}: no_bias=false is not supported (transformers' MPT has no biases)")
    if hf.get("logit_scale") is not None:
        raise CheckpointError(f"{source}: logit_scale={hf['logit_scale']!r} is not supported")
    norm_type = hf.get("norm_type", "low_precision_layernorm")
    if norm_type not in _NORM_TYPES:
        raise CheckpointError(f"{source}: norm_type={norm_type!r} is not supported (supported: {_NORM_TYPES})")
    hidden = int(require(hf, "d_model", source))
    heads = int(require(hf, "n_heads", source))
    if hidden % heads:
        raise CheckpointError(f"{source}: d_model {hidden} is not a multiple of the {heads} heads")
    softmax_scale = attn.get("softmax_scale")
    return ModelConfig(
        model_type="mpt",
        # MPT's own code sizes the MLP by expansion_ratio (transformers assumes 4); the weights' shapes are
        # checked against this, so a disagreement is an error, not a silent misread.
        **hf_sizes(hf, source, hidden_size=hidden, num_layers=int(require(hf, "n_layers", source)), num_heads=heads,
                   num_kv_heads=heads, head_dim=hidden // heads,
                   intermediate_size=int(float(hf.get("expansion_ratio", 4)) * hidden),
                   max_position_embeddings=int(hf.get("max_seq_len", 2048))),
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        norm_bias=False,
        positions="alibi",
        attention_scale=None if softmax_scale is None else float(softmax_scale),
        activation="gelu",
        gated_mlp=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def _wqkv(x: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`Wqkv` `[3 * H * hd, D]`, output features `[q; k; v]` each `[H, hd]` -> q, k, v `[D, H, hd]`."""
    w = x.reshape(3, cfg.num_heads, cfg.head_dim, x.shape[1]).transpose(0, 3, 1, 2)
    return w[0], w[1], w[2]


def key_map(cfg: ModelConfig) -> list[Rule | Derived]:
    """HF tensor names of MPT -> canonical names."""
    layer = r"transformer\.blocks\.(?P<layer>\d+)\."
    return [
        Rule(r"transformer\.wte\.weight", "embed", keep),
        Rule(layer + r"norm_1\.weight", "layers/ln1/scale", keep),
        Rule(layer + r"attn\.Wqkv\.weight", ("layers/attn/q/w", "layers/attn/k/w", "layers/attn/v/w"), _wqkv),
        Rule(layer + r"attn\.out_proj\.weight", "layers/attn/o/w", o_out),
        Rule(layer + r"norm_2\.weight", "layers/ln2/scale", keep),
        Rule(layer + r"ffn\.up_proj\.weight", "layers/mlp/up/w", transpose),
        Rule(layer + r"ffn\.down_proj\.weight", "layers/mlp/down/w", transpose),
        Rule(r"transformer\.norm_f\.weight", "final_norm/scale", keep),
        Derived("alibi_slopes", lambda c: mpt_alibi_slopes(c.num_heads)),
        lm_head(cfg),
    ]


FAMILY = Family(
    model_types=MODEL_TYPES,
    example="mosaicml/mpt-7b",
    mechanisms=("ALiBi (MPT slopes)", "fused q/k/v", "LayerNorm without bias", "exact-GELU MLP", "no biases",
                "tied LM head"),
    config_from_hf=config_from_hf,
    key_map=key_map,
    limits="attn_config clip_qkv, qk_ln, prefix_lm, alibi=false, multi-query attention and alibi_bias_max other "
           "than 8 are refused, as are no_bias=false, logit_scale and norm types other than LayerNorm",
)
