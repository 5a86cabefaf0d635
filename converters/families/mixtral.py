"""Mixtral checkpoints (mistralai/Mixtral-*, model_type "mixtral"): Mistral with a mixture of experts.

Attention, norms, RoPE and the optional sliding window are Mistral's (the config is read by llama.py's
`config_from_hf`); each layer's MLP is replaced by `num_local_experts` SiLU-gated experts of which each token
uses `num_experts_per_tok`, routed as transformers' MixtralSparseMoeBlock does: softmax of the router logits
in float32, top-k, the k weights renormalised to sum to one.

Expert weights come in two layouts:
- one tensor per expert, `block_sparse_moe.experts.E.{w1,w3,w2}.weight` (gate, up, down; torch Linear
  `[out, in]`) with the router `block_sparse_moe.gate.weight` `[E, D]`: the Hub checkpoints, and what
  transformers 5's `save_pretrained` still writes;
- transformers 5's in-memory form, `mlp.experts.gate_up_proj` `[E, 2F, D]` (gate rows first, then up),
  `mlp.experts.down_proj` `[E, D, F]` and `mlp.gate.weight`, which a checkpoint saved from its state dict has.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from converters.families import llama
from converters.family import Family
from converters.hf_config import require
from converters.keymap import Rule, keep, lm_head, o_out, qkv_rules, transpose
from hdex_jax.config import ModelConfig

MODEL_TYPES = ("mixtral",)

# MixtralConfig's default, which transformers uses when config.json gives no theta (Llama's is 10000).
DEFAULT_ROPE_THETA = 1e6


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig of a Mixtral `config.json` dict; `source` names the file in errors."""
    cfg = llama.config_from_hf({"rope_theta": DEFAULT_ROPE_THETA, **hf}, source)
    return dataclasses.replace(
        cfg,
        # MixtralModel uses a sliding-window mask on every layer whenever `sliding_window` is set.
        sliding_window=hf.get("sliding_window"),
        num_experts=int(require(hf, "num_local_experts", source)),
        experts_per_token=int(require(hf, "num_experts_per_tok", source)),
    )


def _experts_linear(x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """A stack of torch Linear weights `[E, out, in]` -> `[E, in, out]`."""
    return x.transpose(0, 2, 1)


def _split_gate_up(x: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """`gate_up_proj` `[E, 2F, D]` -> gate and up `[E, D, F]` each (MixtralExperts chunks gate first)."""
    gate, up = np.split(x, 2, axis=1)
    return _experts_linear(gate, cfg), _experts_linear(up, cfg)


def key_map(cfg: ModelConfig) -> list[Rule]:
    """HF tensor names of Mixtral (both expert layouts) -> canonical names."""
    layer = r"model\.layers\.(?P<layer>\d+)\."
    expert = layer + r"block_sparse_moe\.experts\.(?P<expert>\d+)\."
    return [
        Rule(r"model\.embed_tokens\.weight", "embed", keep),
        Rule(layer + r"input_layernorm\.weight", "layers/ln1/scale", keep),
        Rule(layer + r"post_attention_layernorm\.weight", "layers/ln2/scale", keep),
        *qkv_rules(layer),
        Rule(layer + r"self_attn\.o_proj\.weight", "layers/attn/o/w", o_out),
        Rule(layer + r"(?:block_sparse_moe|mlp)\.gate\.weight", "layers/moe/router/w", transpose),
        Rule(expert + r"w1\.weight", "layers/moe/gate/w", transpose),
        Rule(expert + r"w3\.weight", "layers/moe/up/w", transpose),
        Rule(expert + r"w2\.weight", "layers/moe/down/w", transpose),
        Rule(layer + r"mlp\.experts\.gate_up_proj", ("layers/moe/gate/w", "layers/moe/up/w"), _split_gate_up),
        Rule(layer + r"mlp\.experts\.down_proj", "layers/moe/down/w", _experts_linear),
        Rule(r"model\.norm\.weight", "final_norm/scale", keep),
        lm_head(cfg),
    ]


FAMILY = Family(
    model_types=MODEL_TYPES,
    example="mistralai/Mixtral-8x7B-v0.1",
    mechanisms=("top-k routed SiLU-gated experts (softmax, top-k, renormalised)", "per-expert and fused expert tensors",
                "RMSNorm", "rotate-half RoPE", "grouped-query attention", "sliding window"),
    config_from_hf=config_from_hf,
    key_map=key_map,
    limits="rope scaling: linear, dynamic, yarn, llama3 and longrope (other types refused, naming them)",
)
