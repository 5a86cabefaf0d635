"""GPT-NeoX checkpoints (EleutherAI/pythia-*, gpt-neox-20b, RedPajama-INCITE, ...): LayerNorm, partial
rotate-half RoPE, biases, and a parallel residual with two norms (`use_parallel_residual=true`:
h + attn(ln1(h)) + mlp(ln2(h))) or the usual sequential pre-LN block.

q, k and v are one nn.Linear `query_key_value` whose output axis is laid out per head: [H, 3, hd], i.e.
[q0 k0 v0 q1 k1 v1 ...]. Only the first `rotary_pct * head_dim` features of each head are rotated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from converters.errors import CheckpointError
from converters.families._rotary import rope_scaling
from converters.family import Family
from converters.hf_config import activation, hf_sizes, require
from converters.keymap import QKV, Rule, ignore, keep, linear, lm_head, norm, o_out
from hdex_jax.config import ModelConfig

MODEL_TYPES = ("gpt_neox",)

# GPTNeoXConfig's defaults for configs that leave the keys out.
LAYER_NORM_EPS = 1e-5
ROPE_THETA = 10000.0
ROTARY_PCT = 0.25


def _rope(hf: Mapping[str, Any], source: str) -> tuple[float, tuple[tuple[str, Any], ...], float]:
    """(theta, scaling items, partial rotary factor), read as GPTNeoXConfig does: `rope_scaling` (old files)
    or `rope_parameters` (transformers >= 5), whose theta and factor default to the old top-level
    `rotary_emb_base` and `rotary_pct`."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    theta = params.get("rope_theta", hf.get("rotary_emb_base", ROPE_THETA))
    partial = params.get("partial_rotary_factor", hf.get("rotary_pct", ROTARY_PCT))
    return float(theta), rope_scaling(params, hf, source), float(partial)


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig of a GPT-NeoX `config.json` dict; `source` names the file in errors."""
    hidden = int(require(hf, "hidden_size", source))
    heads = int(require(hf, "num_attention_heads", source))
    if hidden % heads:
        raise CheckpointError(f"{source}: hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
    theta, scaling, partial = _rope(hf, source)
    # Computed as transformers does, so both rotate the same number of features.
    rope_dim = int(hidden // heads * partial)
    if rope_dim % 2:
        raise CheckpointError(f"{source}: rotary_pct={partial} rotates {rope_dim} features per head; an odd "
                              f"count is not supported")
    parallel = bool(hf.get("use_parallel_residual", True))
    attention_bias = bool(hf.get("attention_bias", True))
    return ModelConfig(
        model_type="gpt_neox",
        **hf_sizes(hf, source, hidden_size=hidden, num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads),
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_eps", LAYER_NORM_EPS)),
        parallel_residual=parallel,
        shared_norm=False,
        positions="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        partial_rotary_factor=partial,
        activation=activation(hf.get("hidden_act", "gelu"), "hidden_act", source),
        gated_mlp=False,
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        mlp_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def split_per_head_qkv(x: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A fused nn.Linear q/k/v laid out per head, weight `[H*3*hd, D]` or bias `[H*3*hd]` -> q, k, v as
    `[D, H, hd]` / `[H, hd]`. Also GPTBigCode's `c_attn` with `multi_query=false`."""
    heads, hd = cfg.num_heads, cfg.head_dim
    if x.shape[0] != heads * 3 * hd:
        raise ValueError(f"the fused q/k/v axis should be {heads} heads * 3 * {hd} wide")
    per_head = x.reshape(heads, 3, hd, *x.shape[1:])
    # Weight: [H, hd, D] -> [D, H, hd]; bias: [H, hd] as is.
    return tuple(np.moveaxis(per_head[:, i], (0, 1), (-2, -1)) for i in range(3))


def key_map(cfg: ModelConfig) -> list[Rule]:
    """HF tensor names of GPT-NeoX -> canonical names."""
    layer = r"gpt_neox\.layers\.(?P<layer>\d+)\."
    return [
        Rule(r"gpt_neox\.embed_in\.weight", "embed", keep),
        *norm(layer + r"input_layernorm", "layers/ln1"),
        *linear(layer + r"attention\.query_key_value", QKV, split_per_head_qkv, split_per_head_qkv),
        *linear(layer + r"attention\.dense", "layers/attn/o", o_out),
        *norm(layer + r"post_attention_layernorm", "layers/ln2"),
        *linear(layer + r"mlp\.dense_h_to_4h", "layers/mlp/up"),
        *linear(layer + r"mlp\.dense_4h_to_h", "layers/mlp/down"),
        *norm(r"gpt_neox\.final_layer_norm", "final_norm"),
        # Old files (pythia) saved the causal mask, its fill value and the rotary frequencies as buffers.
        ignore(layer + r"attention\.(?:masked_bias|bias|rotary_emb\.inv_freq)"),
        ignore(r"gpt_neox\.rotary_emb\.inv_freq"),
        # The head is `embed_out` in the Hub files and `lm_head` in the class since transformers 5; a tied
        # checkpoint may still carry a copy of the embedding.
        lm_head(cfg, r"(?:embed_out|lm_head)\.weight"),
    ]


FAMILY = Family(
    model_types=MODEL_TYPES,
    example="EleutherAI/pythia-70m",
    mechanisms=("partial rotate-half RoPE (rotary_pct)", "LayerNorm", "GELU MLP", "biases",
                "fused per-head query_key_value", "parallel residual with two norms, or sequential"),
    config_from_hf=config_from_hf,
    key_map=key_map,
    limits=("rope scaling: linear, dynamic, yarn, llama3 and longrope "
            "(other types refused, naming them); an odd rotary dimension is refused"),
)
