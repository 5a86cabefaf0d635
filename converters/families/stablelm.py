"""StableLM checkpoints (stabilityai/stablelm-2-1_6b, stablelm-3b-4e1t, stablelm-zephyr-3b): LayerNorm with a
bias, rotate-half RoPE on the first `partial_rotary_factor` of each head (0.25 when config.json leaves it out,
as StableLmConfig assumes), optional q/k/v biases (`use_qkv_bias`, StableLM 2), a SiLU-gated MLP without
biases. `use_parallel_residual` makes the block h + attn(ln(h)) + mlp(ln(h)) with the one `input_layernorm`
(transformers then builds no `post_attention_layernorm`); otherwise it is sequential pre-LN.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from converters.errors import CheckpointError
from converters.families._rotary import hf_rope
from converters.family import Family
from converters.hf_config import activation, hf_sizes, require
from converters.keymap import Rule, gated_mlp, keep, lm_head, norm, o_out, qkv_rules
from hdex_jax.config import ModelConfig

MODEL_TYPES = ("stablelm",)

# StableLmConfig's defaults.
_LAYER_NORM_EPS = 1e-5
_PARTIAL_ROTARY_FACTOR = 0.25


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig of a stablelm `config.json` dict; `source` names the file in errors."""
    if hf.get("qk_layernorm"):
        # Per-head LayerNorms on q and k (StableLM 2 12B): not a mechanism of the canonical model.
        raise CheckpointError(f"{source}: qk_layernorm=true is not supported")
    hidden = int(require(hf, "hidden_size", source))
    heads = int(require(hf, "num_attention_heads", source))
    parallel = bool(hf.get("use_parallel_residual", False))
    theta, scaling, partial = hf_rope(hf, source, default_partial=_PARTIAL_ROTARY_FACTOR)
    return ModelConfig(
        model_type="stablelm",
        # StableLmAttention always splits hidden_size evenly over the heads; it reads no head_dim.
        **hf_sizes(hf, source, hidden_size=hidden, num_heads=heads, head_dim=hidden // heads),
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_eps") or _LAYER_NORM_EPS),
        parallel_residual=parallel,
        shared_norm=parallel,
        positions="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        partial_rotary_factor=partial,
        activation=activation(hf.get("hidden_act", "silu"), "hidden_act", source),
        gated_mlp=True,
        qkv_bias=bool(hf.get("use_qkv_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def key_map(cfg: ModelConfig) -> list[Rule]:
    """HF tensor names of StableLM -> canonical names. q/k/v bias rules are always listed: a bias the config
    (`use_qkv_bias`) does not declare is an error, as is a `post_attention_layernorm` in a parallel model."""
    layer = r"model\.layers\.(?P<layer>\d+)\."
    return [
        Rule(r"model\.embed_tokens\.weight", "embed", keep),
        *norm(layer + r"input_layernorm", "layers/ln1"),
        *norm(layer + r"post_attention_layernorm", "layers/ln2"),
        *qkv_rules(layer),
        Rule(layer + r"self_attn\.o_proj\.weight", "layers/attn/o/w", o_out),
        *gated_mlp(layer),
        *norm(r"model\.norm", "final_norm"),
        lm_head(cfg),
    ]


FAMILY = Family(
    model_types=MODEL_TYPES,
    example="stabilityai/stablelm-2-1_6b",
    mechanisms=("LayerNorm", "rotate-half RoPE (partial)", "SiLU-gated MLP", "optional q/k/v biases",
                "sequential or parallel residual (one shared LayerNorm)", "grouped-query attention"),
    config_from_hf=config_from_hf,
    key_map=key_map,
    limits=("qk_layernorm=true is refused; rope scaling: linear, dynamic, yarn, llama3 and longrope "
            "(other types refused, naming them)"),
)
