"""Qwen3-MoE checkpoints (Qwen/Qwen3-30B-A3B and others, model_type "qwen3_moe"): Qwen3's attention (see qwen3.py:
per-head q/k RMSNorm) with every layer's MLP replaced by `num_experts` SiLU-gated experts of
`moe_intermediate_size` features and no shared expert, of which each token uses `num_experts_per_tok`, routed as
transformers' Qwen3MoeSparseMoeBlock does: softmax of the router logits in float32, top-k, and the k weights
renormalised to sum to one only with `norm_topk_prob`. With `use_sliding_window`, every layer attends within
`sliding_window`.

Experts are saved one tensor per expert (`mlp.experts.E.{gate,up,down}_proj.weight`, torch Linear `[out, in]`)
with the router `mlp.gate.weight` `[E, D]`; transformers 5's in-memory fused form (`mlp.experts.gate_up_proj`
`[E, 2F, D]`, `mlp.experts.down_proj` `[E, D, F]`) is read too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from converters.errors import CheckpointError
from converters.families import llama, mixtral
from converters.family import Family
from converters.hf_config import require
from converters.keymap import Rule, keep, lm_head, o_out, qk_norms, qkv_rules, transpose
from hdex_jax.config import ModelConfig

MODEL_TYPES = ("qwen3_moe",)


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig of a Qwen3-MoE `config.json` dict; `source` names the file in errors."""
    if hf.get("mlp_only_layers") or int(hf.get("decoder_sparse_step") or 1) != 1:
        raise CheckpointError(f"{source}: mlp_only_layers={hf.get('mlp_only_layers')} / decoder_sparse_step="
                              f"{hf.get('decoder_sparse_step')} make some layers dense, which is not supported "
                              f"(every layer must be a mixture of experts)")
    experts = hf.get("num_experts") or hf.get("num_local_experts")
    if experts is None:
        raise CheckpointError(f"{source} has no 'num_experts', which model_type 'qwen3_moe' requires")
    cfg = llama.config_from_hf(hf, source)
    return dataclasses.replace(
        cfg,
        intermediate_size=int(require(hf, "moe_intermediate_size", source)),
        qk_norm="head",
        sliding_window=int(hf["sliding_window"]) if hf.get("use_sliding_window") and hf.get("sliding_window") else None,
        num_experts=int(experts),
        experts_per_token=int(require(hf, "num_experts_per_tok", source)),
        moe_renormalize=bool(hf.get("norm_topk_prob", False)),
    )


def key_map(cfg: ModelConfig) -> list[Rule]:
    """HF tensor names of Qwen3-MoE (both expert layouts) -> canonical names."""
    layer = r"model\.layers\.(?P<layer>\d+)\."
    expert = layer + r"mlp\.experts\.(?P<expert>\d+)\."
    return [
        Rule(r"model\.embed_tokens\.weight", "embed", keep),
        Rule(layer + r"input_layernorm\.weight", "layers/ln1/scale", keep),
        Rule(layer + r"post_attention_layernorm\.weight", "layers/ln2/scale", keep),
        *qkv_rules(layer),
        *qk_norms(layer),
        Rule(layer + r"self_attn\.o_proj\.weight", "layers/attn/o/w", o_out),
        Rule(layer + r"mlp\.gate\.weight", "layers/moe/router/w", transpose),
        Rule(expert + r"gate_proj\.weight", "layers/moe/gate/w", transpose),
        Rule(expert + r"up_proj\.weight", "layers/moe/up/w", transpose),
        Rule(expert + r"down_proj\.weight", "layers/moe/down/w", transpose),
        Rule(layer + r"mlp\.experts\.gate_up_proj", ("layers/moe/gate/w", "layers/moe/up/w"), mixtral._split_gate_up),
        Rule(layer + r"mlp\.experts\.down_proj", "layers/moe/down/w", mixtral._experts_linear),
        Rule(r"model\.norm\.weight", "final_norm/scale", keep),
        lm_head(cfg),
    ]


FAMILY = Family(
    model_types=MODEL_TYPES,
    example="Qwen/Qwen3-30B-A3B",
    mechanisms=("top-k routed SiLU-gated experts without a shared expert (norm_topk_prob)",
                "decode reads only the chosen experts", "per-head q/k RMSNorm before RoPE", "RMSNorm",
                "rotate-half RoPE", "grouped-query attention"),
    config_from_hf=config_from_hf,
    key_map=key_map,
    limits=llama.FAMILY.limits + "; dense layers among the expert ones (mlp_only_layers, decoder_sparse_step) are "
                                 "refused",
)
