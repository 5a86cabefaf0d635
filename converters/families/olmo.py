"""OLMo checkpoints (allenai/OLMo-1B-hf, OLMo-7B-hf, OLMo-1.7-7B-hf): every LayerNorm is non-parametric
(OlmoLayerNorm: no weight, no bias, epsilon fixed at 1e-5), so the checkpoint stores no norm tensors at all.
Otherwise Llama-like: rotate-half RoPE on whole heads, a SiLU-gated MLP, optional attention biases
(`attention_bias`, on q/k/v and o alike), an untied LM head unless `tie_word_embeddings`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from converters.errors import CheckpointError
from converters.families._rotary import hf_rope
from converters.family import Family
from converters.hf_config import activation, hf_sizes
from converters.keymap import Rule, gated_mlp, keep, linear, lm_head, o_out, qkv_rules
from hdex_jax.config import ModelConfig

MODEL_TYPES = ("olmo",)

# Hard-coded in OlmoLayerNorm.forward; config.json has no key for it.
_LAYER_NORM_EPS = 1e-5


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig of an olmo `config.json` dict; `source` names the file in errors."""
    if hf.get("clip_qkv") is not None:
        # Clamping q, k and v to [-clip_qkv, clip_qkv] (OLMo-1.7) is not a mechanism of the canonical model.
        raise CheckpointError(f"{source}: clip_qkv={hf['clip_qkv']!r} is not supported (only null)")
    bias = bool(hf.get("attention_bias", False))
    # OLMo's rotary embedding ignores any partial factor and rotates whole heads.
    theta, scaling, _ = hf_rope(hf, source)
    return ModelConfig(
        model_type="olmo",
        **hf_sizes(hf, source),
        norm="layernorm",
        norm_eps=_LAYER_NORM_EPS,
        norm_scale=False,
        norm_bias=False,
        positions="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        activation=activation(hf.get("hidden_act", "silu"), "hidden_act", source),
        gated_mlp=True,
        qkv_bias=bias,
        o_bias=bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def key_map(cfg: ModelConfig) -> list[Rule]:
    """HF tensor names of OLMo -> canonical names (no norm tensors exist). Bias rules are always listed: a bias
    the config (`attention_bias`) does not declare is an error."""
    layer = r"model\.layers\.(?P<layer>\d+)\."
    return [
        Rule(r"model\.embed_tokens\.weight", "embed", keep),
        *qkv_rules(layer),
        *linear(layer + r"self_attn\.o_proj", "layers/attn/o", o_out),
        *gated_mlp(layer),
        lm_head(cfg),
    ]


FAMILY = Family(
    model_types=MODEL_TYPES,
    example="allenai/OLMo-1B-hf",
    mechanisms=("non-parametric LayerNorm (no weight, no bias)", "rotate-half RoPE", "SiLU-gated MLP",
                "optional attention biases"),
    config_from_hf=config_from_hf,
    key_map=key_map,
    limits=("clip_qkv (OLMo-1.7) is refused; rope scaling: linear, dynamic, yarn, llama3 and longrope "
            "(other types refused, naming them)"),
)
