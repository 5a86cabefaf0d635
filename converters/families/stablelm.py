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
from converters.families._rotary import unscaled_rope
from converters.family import Family
from converters.hf_config import activation, require
from converters.keymap import Rule, ignore, keep, o_out, qkv_rules, transpose
from hdex_jax.config import ModelConfig, eos_ids

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
    theta, partial = unscaled_rope(hf, source, default_partial=_PARTIAL_ROTARY_FACTOR)
    return ModelConfig(
        model_type="stablelm",
        vocab_size=int(require(hf, "vocab_size", source)),
        hidden_size=hidden,
        num_layers=int(require(hf, "num_hidden_layers", source)),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        # StableLmAttention always splits hidden_size evenly over the heads; it reads no head_dim.
        head_dim=hidden // heads,
        intermediate_size=int(require(hf, "intermediate_size", source)),
        max_position_embeddings=int(require(hf, "max_position_embeddings", source)),
        embed_dim=hidden,
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_eps") or _LAYER_NORM_EPS),
        parallel_residual=parallel,
        shared_norm=parallel,
        positions="rope",
        rope_theta=theta,
        partial_rotary_factor=partial,
        activation=activation(hf.get("hidden_act", "silu"), "hidden_act", source),
        gated_mlp=True,
        qkv_bias=bool(hf.get("use_qkv_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
    )


def key_map(cfg: ModelConfig) -> list[Rule]:
    """HF tensor names of StableLM -> canonical names. q/k/v bias rules are always listed: a bias the config
    (`use_qkv_bias`) does not declare is an error, as is a `post_attention_layernorm` in a parallel model."""
    layer = r"model\.layers\.(?P<layer>\d+)\."
    rules = [
        Rule(r"model\.embed_tokens\.weight", "embed", keep),
        Rule(layer + r"input_layernorm\.weight", "layers/ln1/scale", keep),
        Rule(layer + r"input_layernorm\.bias", "layers/ln1/bias", keep),
        Rule(layer + r"post_attention_layernorm\.weight", "layers/ln2/scale", keep),
        Rule(layer + r"post_attention_layernorm\.bias", "layers/ln2/bias", keep),
        *qkv_rules(layer),
        Rule(layer + r"self_attn\.o_proj\.weight", "layers/attn/o/w", o_out),
        Rule(layer + r"mlp\.gate_proj\.weight", "layers/mlp/gate/w", transpose),
        Rule(layer + r"mlp\.up_proj\.weight", "layers/mlp/up/w", transpose),
        Rule(layer + r"mlp\.down_proj\.weight", "layers/mlp/down/w", transpose),
        Rule(r"model\.norm\.weight", "final_norm/scale", keep),
        Rule(r"model\.norm\.bias", "final_norm/bias", keep),
    ]
    # A tied checkpoint may still carry a copy of the embedding as lm_head.weight.
    rules.append(ignore(r"lm_head\.weight") if cfg.tie_embeddings else Rule(r"lm_head\.weight", "lm_head/w", transpose))
    return rules


FAMILY = Family(
    model_types=MODEL_TYPES,
    example="stabilityai/stablelm-2-1_6b",
    mechanisms=("LayerNorm", "rotate-half RoPE (partial)", "SiLU-gated MLP", "optional q/k/v biases",
                "sequential or parallel residual (one shared LayerNorm)", "grouped-query attention"),
    config_from_hf=config_from_hf,
    key_map=key_map,
    limits="qk_layernorm=true and rope scaling are refused",
)
