"""Cohere Command-R checkpoints (CohereForAI/c4ai-command-r-*, model_type "cohere"): the Llama tensor names (see
llama.py) in a parallel block, h + attn(ln(h)) + mlp(ln(h)), with one LayerNorm per layer that has a scale and
no bias (`input_layernorm`), the final logits multiplied by `logit_scale`, a tied head by default, and RoPE on
*interleaved* pairs (features 2i and 2i + 1 turn by frequency i, as GPT-J's). As for GPT-J (see gptj.py), the
converter reorders each q and k head's features (even, then odd), which makes them rotate-half pairs and leaves
every score q.k unchanged; the q/k biases follow. With `use_qk_norm` (Command R+), q and k are LayerNormed per
head with per-head scales `[heads, head_dim]` before RoPE, reordered likewise (a norm's statistics do not depend
on the order of its features).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from converters import gguf_rules
from converters.families import llama
from converters.families.gptj import rotary_permutation
from converters.family import Family
from converters.keymap import (Rule, compose, gated_mlp, ignore, keep, kv_bias, kv_in, kv_scales, linear, lm_head,
                               o_out, q_bias, q_in, q_scales)
from hdex_jax.config import ModelConfig

MODEL_TYPES = ("cohere",)

# CohereConfig's defaults, which transformers uses when config.json leaves a key out.
DEFAULT_LOGIT_SCALE = 0.0625
DEFAULT_LAYER_NORM_EPS = 1e-5
DEFAULT_ROPE_THETA = 10000.0


def to_rotate_half(x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """An array whose last axis is one head's features, reordered by `rotary_permutation` (interleaved pairs ->
    rotate-half pairs)."""
    return x[..., rotary_permutation(cfg.head_dim, cfg.rope_dim)]


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig of a Cohere `config.json` dict; `source` names the file in errors."""
    cfg = llama.config_from_hf({"rope_theta": DEFAULT_ROPE_THETA, **hf}, source)
    logit_scale = hf.get("logit_scale")
    return dataclasses.replace(
        cfg,
        norm="layernorm",
        norm_bias=False,
        norm_eps=float(hf.get("layer_norm_eps") or DEFAULT_LAYER_NORM_EPS),
        parallel_residual=True,
        shared_norm=True,
        qk_norm="head" if hf.get("use_qk_norm") else "none",
        logit_scale=float(DEFAULT_LOGIT_SCALE if logit_scale is None else logit_scale),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def key_map(cfg: ModelConfig) -> list[Rule]:
    """HF tensor names of Cohere -> canonical names, q and k (weights, biases, norms) reordered for rotate-half."""
    layer = r"model\.layers\.(?P<layer>\d+)\."
    attn = layer + r"self_attn\."
    return [
        Rule(r"model\.embed_tokens\.weight", "embed", keep),
        Rule(layer + r"input_layernorm\.weight", "layers/ln1/scale", keep),
        *linear(attn + r"q_proj", "layers/attn/q", compose(q_in, to_rotate_half), compose(q_bias, to_rotate_half)),
        *linear(attn + r"k_proj", "layers/attn/k", compose(kv_in, to_rotate_half),
                compose(kv_bias, to_rotate_half)),
        *linear(attn + r"v_proj", "layers/attn/v", kv_in, kv_bias),
        Rule(attn + r"q_norm\.weight", "layers/attn/q_norm/scale", compose(q_scales, to_rotate_half)),
        Rule(attn + r"k_norm\.weight", "layers/attn/k_norm/scale", compose(kv_scales, to_rotate_half)),
        *linear(attn + r"o_proj", "layers/attn/o", o_out),
        *gated_mlp(layer),
        Rule(r"model\.norm\.weight", "final_norm/scale", keep),
        ignore(r"model\.(?:layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq"),
        lm_head(cfg),
    ]


def _gguf_fields(meta: gguf_rules.GGUFMeta) -> dict[str, Any]:
    return {"logit_scale": float(meta.get("logit_scale", 1.0)),
            "qk_norm": "head" if meta.has("blk.0.attn_q_norm.weight") else "none"}


def _gguf_rules(cfg: ModelConfig) -> list[Rule]:
    """command-r: q/k are written as Hugging Face has them (llama.cpp's "normal" rope turns adjacent pairs, as
    Cohere does), so they are reordered for rotate-half as `key_map` does."""
    qk_norms = gguf_rules.qk_norms(to_rotate_half) if cfg.qk_norm != "none" else []
    return [*gguf_rules.embeddings(lm_head=False), *gguf_rules.layer_norm("attn_norm", "layers/ln1"),
            *gguf_rules.attention(then=to_rotate_half), *qk_norms, *gguf_rules.mlp(gated=True)]


FAMILY = Family(
    model_types=MODEL_TYPES,
    example="CohereForAI/c4ai-command-r7b-12-2024",
    mechanisms=("parallel attention and MLP with one shared LayerNorm (scale, no bias)",
                "interleaved RoPE, reordered to rotate-half at conversion", "logit_scale", "per-head q/k LayerNorm "
                "(use_qk_norm)", "SiLU-gated MLP", "grouped-query attention", "tied head"),
    config_from_hf=config_from_hf,
    key_map=key_map,
    limits=llama.FAMILY.limits + "; Cohere 2 (cohere2, sliding layers) is not read",
    # GGUF: the LayerNorms have no bias, the head is tied, the logits are multiplied by `logit_scale`.
    gguf={"command-r": gguf_rules.GGUFArch(
        fixed={"norm": "layernorm", "norm_bias": False, "positions": "rope", "activation": "silu",
               "gated_mlp": True, "parallel_residual": True, "shared_norm": True},
        key_map=_gguf_rules,
        from_file=_gguf_fields)},
)
