"""Llama-style checkpoints: Llama 1/2/3 (any rope scaling, llama3 included), SmolLM2, Mistral and Qwen2.

They share one tensor layout (`model.layers.N.self_attn.q_proj.weight`, ...): RMSNorm, rotate-half RoPE, a
SiLU-gated MLP. They differ in config only: Qwen2 always has q/k/v biases, Llama may have `attention_bias`
and `mlp_bias`, Mistral (and Qwen2 when enabled) uses a sliding window.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from converters import gguf_rules
from converters.families._rotary import hf_rope
from converters.family import Family
from converters.hf_config import activation, hf_sizes, require
from converters.keymap import Rule, gated_mlp, ignore, keep, linear, lm_head, o_out, qkv_rules
from hdex_jax.config import ModelConfig

MODEL_TYPES = ("llama", "mistral", "qwen2")

# Qwen2Config's default, used when an old config.json leaves the key out.
_QWEN2_DEFAULT_MAX_WINDOW_LAYERS = 28


def _sliding_window(hf: Mapping[str, Any], num_layers: int) -> tuple[int | None, tuple[bool, ...]]:
    """(window, which layers use it; empty for all). Qwen2 slides only on the layers its `layer_types` (or, in
    older files, `max_window_layers`) mark, and only when `use_sliding_window` is set, as transformers does."""
    model_type = hf["model_type"]
    if model_type == "mistral":
        return hf.get("sliding_window"), ()
    if model_type != "qwen2" or not hf.get("use_sliding_window") or hf.get("sliding_window") is None:
        return None, ()
    max_window_layers = hf.get("max_window_layers", _QWEN2_DEFAULT_MAX_WINDOW_LAYERS)
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if i >= max_window_layers else "full_attention" for i in range(num_layers)]
    sliding = tuple(t == "sliding_attention" for t in layer_types)
    if not any(sliding):
        return None, ()
    return int(hf["sliding_window"]), () if all(sliding) else sliding


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig of a llama / mistral / qwen2 `config.json` dict; `source` names the file in errors."""
    model_type = require(hf, "model_type", source)
    hidden = int(require(hf, "hidden_size", source))
    heads = int(require(hf, "num_attention_heads", source))
    layers = int(require(hf, "num_hidden_layers", source))
    theta, scaling, partial = hf_rope(hf, source)
    window, sliding_layers = _sliding_window(hf, layers)
    attention_bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        model_type=model_type,
        **hf_sizes(hf, source, hidden_size=hidden, num_layers=layers, num_heads=heads),
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        pre_norm=True,
        final_norm=True,
        positions="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        partial_rotary_factor=partial,
        sliding_window=window,
        sliding_layers=sliding_layers,
        activation=activation(hf.get("hidden_act", "silu"), "hidden_act", source),
        gated_mlp=True,
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=False if model_type == "qwen2" else attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def key_map(cfg: ModelConfig) -> list[Rule]:
    """HF tensor names of the llama layout -> canonical names. Bias rules are always listed: whether a
    bias is expected is decided by the config, and a bias the config does not declare is an error."""
    layer = r"model\.layers\.(?P<layer>\d+)\."
    return [
        Rule(r"model\.embed_tokens\.weight", "embed", keep),
        Rule(layer + r"input_layernorm\.weight", "layers/ln1/scale", keep),
        Rule(layer + r"post_attention_layernorm\.weight", "layers/ln2/scale", keep),
        *qkv_rules(layer),
        *linear(layer + r"self_attn\.o_proj", "layers/attn/o", o_out),
        *gated_mlp(layer, bias=True),
        Rule(r"model\.norm\.weight", "final_norm/scale", keep),
        # Older checkpoints saved the rotary inverse frequencies as buffers; they are recomputed from config.
        ignore(r"model\.(?:layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq"),
        lm_head(cfg),
    ]


FAMILY = Family(
    model_types=MODEL_TYPES,
    example="HuggingFaceTB/SmolLM2-135M-Instruct",
    mechanisms=("RMSNorm", "rotate-half RoPE, any rope scaling (hdex_jax/rope.py)", "SiLU-gated MLP",
                "grouped-query attention", "optional biases",
                "sliding window (Mistral; Qwen2, also on some layers only)"),
    config_from_hf=config_from_hf,
    key_map=key_map,
    limits="rope scaling: linear, dynamic, yarn, llama3 and longrope (other types refused, naming them)",
    gguf={
        "llama": gguf_rules.GGUFArch(
            fixed=gguf_rules.ROPE_SILU,
            key_map=gguf_rules.rules(gguf_rules.embeddings(), gguf_rules.sequential_norms(),
                                     gguf_rules.attention(permuted=True), gguf_rules.mlp(gated=True)),
            permuted_qk=True,
            limits="rope scaling: linear, yarn and rope_freqs (llama3); a rope_freqs tensor with another scaling "
                   "is refused"),
        "qwen2": gguf_rules.GGUFArch(
            fixed=gguf_rules.ROPE_SILU,
            key_map=gguf_rules.rules(gguf_rules.embeddings(), gguf_rules.sequential_norms(), gguf_rules.attention(),
                                     gguf_rules.mlp(gated=True)),
            limits="rope scaling: linear and yarn"),
    },
)
