"""Falcon checkpoints (tiiuae/falcon-*): one fused `query_key_value` in three layouts, parallel or sequential
blocks, rotate-half RoPE or ALiBi (falcon-rw), exact GELU, optional biases, LM head tied to the embeddings.

The fused q/k/v layouts are all `bloom.grouped_qkv` with different head counts:
- new_decoder_architecture (falcon-40b/180b/11B): `[KV, G + 2, hd]`, num_kv_heads groups of G query heads;
- multi_query (falcon-7b): `[H q | 1 k | 1 v]`, i.e. one group of H query heads;
- classic (falcon-rw): per-head interleaved `[H, 3, hd]`, i.e. H groups of one.

Blocks: new_decoder_architecture is parallel with two norms (`ln_attn`, `ln_mlp`) or, with
num_ln_in_parallel_attn=1, one; otherwise parallel_attn=true shares `input_layernorm` between attention and MLP
and parallel_attn=false is sequential (`input_layernorm`, `post_attention_layernorm`).

ALiBi (alibi=true): transformers rounds BLOOM's slopes to bfloat16, multiplies them by the key positions (the
product is rounded to bfloat16 again) and adds the result before the 1/sqrt(head_dim) scaling of the scores.
The derived slopes here are the bfloat16-rounded slopes divided by sqrt(head_dim); the product with the
position is kept in float32. The two agree exactly whenever the product is a bfloat16 number (slopes that are
powers of two, i.e. up to 7 heads and 8, times positions below 256) and otherwise differ by at most 2^-9 of
the bias, transformers' own rounding error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from converters import gguf_rules
from converters.errors import CheckpointError
from converters.families._rotary import hf_rope
from converters.families.bloom import bloom_alibi_slopes, grouped_qkv, grouped_qkv_bias
from converters.family import Family
from converters.hf_config import activation, hf_sizes, require
from converters.keymap import QKV, Derived, Rule, keep, linear, lm_head, norm, o_out
from hdex_jax.config import ModelConfig

MODEL_TYPES = ("falcon",)

def falcon_alibi_slopes(cfg: ModelConfig) -> np.ndarray:
    """The per-head ALiBi slopes of a falcon-rw model in the canonical model's units (added to the scaled
    scores): BLOOM's slopes rounded to bfloat16 as transformers does, divided by sqrt(head_dim)."""
    rounded = np.asarray(bloom_alibi_slopes(cfg.num_heads), dtype=jnp.bfloat16).astype(np.float32)
    return (rounded / np.float32(math.sqrt(cfg.head_dim))).astype(np.float32)


def _block(hf: Mapping[str, Any], source: str) -> tuple[bool, bool]:
    """(parallel_residual, shared_norm), refusing the combinations transformers' FalconDecoderLayer cannot run."""
    new_arch = bool(hf.get("new_decoder_architecture", False))
    parallel = bool(hf.get("parallel_attn", True))
    num_ln = hf.get("num_ln_in_parallel_attn")
    if new_arch:
        if not parallel:
            raise CheckpointError(f"{source}: new_decoder_architecture=true with parallel_attn=false is not "
                                  f"supported (the new decoder is always parallel)")
        num_ln = 2 if num_ln is None else num_ln
        if num_ln not in (1, 2):
            raise CheckpointError(f"{source}: num_ln_in_parallel_attn={num_ln!r} is not supported (1 or 2)")
        return True, num_ln == 1
    if num_ln not in (None, 1):
        raise CheckpointError(f"{source}: num_ln_in_parallel_attn={num_ln!r} is only supported with "
                              f"new_decoder_architecture=true")
    return parallel, parallel


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig of a Falcon `config.json` dict; `source` names the file in errors."""
    if hf.get("apply_residual_connection_post_layernorm"):
        raise CheckpointError(f"{source}: apply_residual_connection_post_layernorm=true is not supported")
    hidden = int(require(hf, "hidden_size", source))
    heads = int(require(hf, "num_attention_heads", source))
    if hidden % heads:
        raise CheckpointError(f"{source}: hidden_size {hidden} is not a multiple of the {heads} heads")
    if hf.get("new_decoder_architecture"):
        kv_heads = int(hf.get("num_kv_heads") or heads)
    else:
        # Outside the new architecture transformers ignores num_kv_heads: one KV head or one per query head.
        kv_heads = 1 if hf.get("multi_query", True) else heads
    if heads % kv_heads:
        raise CheckpointError(f"{source}: num_attention_heads {heads} is not a multiple of num_kv_heads {kv_heads}")
    alibi = bool(hf.get("alibi", False))
    theta, scaling, _ = hf_rope(hf, source) if not alibi else (10000.0, (), 1.0)
    parallel, shared = _block(hf, source)
    bias = bool(hf.get("bias", False))
    return ModelConfig(
        model_type="falcon",
        **hf_sizes(hf, source, hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads,
                   intermediate_size=int(hf.get("ffn_hidden_size") or 4 * hidden),
                   max_position_embeddings=int(hf.get("max_position_embeddings") or 2048)),
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_epsilon") or 1e-5),
        parallel_residual=parallel,
        shared_norm=shared,
        positions="alibi" if alibi else "rope",
        rope_theta=theta,
        rope_scaling=scaling,
        activation=activation(hf.get("activation") or "gelu", "activation", source),
        gated_mlp=False,
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def key_map(cfg: ModelConfig) -> list[Rule | Derived]:
    """HF tensor names of Falcon -> canonical names. Every norm name is listed: which ones a checkpoint must
    have follows from the config (ln2 exists unless the block shares one norm), and a norm the config does not
    declare is an error."""
    layer = r"transformer\.h\.(?P<layer>\d+)\."
    rules: list[Rule | Derived] = [
        Rule(r"transformer\.word_embeddings\.weight", "embed", keep),
        *linear(layer + r"self_attention\.query_key_value", QKV, grouped_qkv, grouped_qkv_bias),
        *linear(layer + r"self_attention\.dense", "layers/attn/o", o_out),
        *linear(layer + r"mlp\.dense_h_to_4h", "layers/mlp/up"),
        *linear(layer + r"mlp\.dense_4h_to_h", "layers/mlp/down"),
        *norm(r"transformer\.ln_f", "final_norm"),
    ]
    for hf_name, ln in (("input_layernorm", "ln1"), ("ln_attn", "ln1"), ("post_attention_layernorm", "ln2"),
                          ("ln_mlp", "ln2")):
        rules += norm(layer + hf_name, f"layers/{ln}")
    if cfg.positions == "alibi":
        rules.append(Derived("alibi_slopes", falcon_alibi_slopes))
    rules.append(lm_head(cfg))
    return rules


def _gguf_rules(cfg: ModelConfig) -> list[Rule]:
    """Falcon GGUF: one norm shared by the parallel attention and MLP, or (Falcon-40B) `attn_norm_2` before the
    attention and `attn_norm` before the MLP. The convert script renames Falcon-40B's `ln_attn` to `attn_norm_2` and
    `ln_mlp` to `attn_norm` (llama.cpp's attention reads `attn_norm_2`, its MLP `attn_norm`), and reorders
    `query_key_value` from per-KV-group `[q.., k, v]` to all q rows, then all k, then all v ("jploski" layout)."""
    norms = gguf_rules.layer_norm("attn_norm", "layers/ln1") if cfg.shared_norm else \
        [*gguf_rules.layer_norm("attn_norm_2", "layers/ln1"), *gguf_rules.layer_norm("attn_norm", "layers/ln2")]
    return [*gguf_rules.embeddings(), *norms, *gguf_rules.fused_attention(), *gguf_rules.mlp(gated=False)]


def _gguf_fields(meta: gguf_rules.GGUFMeta) -> dict[str, Any]:
    layout = meta.get("tensor_data_layout")
    if layout not in (None, "jploski"):
        raise CheckpointError(f"{meta.path}: falcon.tensor_data_layout={layout!r} is not supported (supported: "
                              f"'jploski', the q/k/v order llama.cpp's convert script writes)")
    return {"shared_norm": not meta.has("blk.0.attn_norm_2.weight")}


FAMILY = Family(
    model_types=MODEL_TYPES,
    example="tiiuae/falcon-7b",
    mechanisms=("fused q/k/v: grouped (new decoder), multi-query, per-head interleaved",
                "parallel block with one or two LayerNorms, or sequential", "rotate-half RoPE or ALiBi (falcon-rw)",
                "GELU MLP", "optional biases", "tied LM head"),
    config_from_hf=config_from_hf,
    key_map=key_map,
    limits="rope scaling: linear, dynamic, yarn, llama3 and longrope (other types refused, naming them); refused: "
           "new_decoder_architecture with parallel_attn=false and apply_residual_connection_post_layernorm=true; "
           "with ALiBi transformers rounds slope x position to bfloat16 and hdex_jax does not (identical up to 8 "
           "heads and 256 positions)",
    gguf={"falcon": gguf_rules.GGUFArch(
        fixed={"norm": "layernorm", "positions": "rope", "activation": "gelu", "gated_mlp": False,
               "parallel_residual": True},
        key_map=_gguf_rules,
        from_file=_gguf_fields,
        limits="only the rope Falcons llama.cpp converts (7B/40B/180B style); Falcon-RW (ALiBi) has no GGUF form")},
)
