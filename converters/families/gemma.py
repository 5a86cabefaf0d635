"""Gemma checkpoints (google/gemma-*, model_type "gemma"): the Llama tensor layout with three differences.

- GemmaRMSNorm multiplies by `(1 + w)`, computed in float32 (`output * (1.0 + self.weight.float())`). The
  converter stores `w + 1` as the canonical scale, so the one RMSNorm of the forward pass (`scale * y`)
  applies it. This is exact, not an approximation: the tensor is read as float32 (bfloat16 and float16 widen
  to float32 exactly), numpy's float32 `w + 1` is the same correctly rounded IEEE addition torch performs, and
  the product with the normalised activations is then the same float32 multiplication.
- The token embedding is multiplied by `sqrt(hidden_size)` (`embed_scale`). transformers holds the factor
  as a float32 tensor and rounds it to the dtype the model runs in (`embed_scale.to(self.weight.dtype)`: 55.5
  for 3072 in bfloat16, 55.43 in float32); the config keeps the float32 value and the forward pass rounds it
  to its dtype (`jnp.asarray(cfg.embed_scale, x.dtype)`), the same two roundings.
- The gated MLP uses the tanh approximation of GELU; `head_dim` is given explicitly and need not be
  hidden_size / num_attention_heads; the LM head is tied to the embedding by default.

`gemma2.py` reads Gemma 2 with the helpers here.

GGUF (gemma, gemma2, gemma3): llama.cpp's convert script stores RMSNorm weights plus one, which is the canonical
`x * scale` already, so they are kept (transformers' gemma2 loader subtracts 1 to get HF weights back; it does not
read gemma files at all). It writes no LM head: the embedding is tied.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from converters import gguf_rules
from converters.errors import CheckpointError
from converters.families._rotary import hf_rope
from converters.family import Family
from converters.hf_config import activation, hf_sizes, require
from converters.keymap import Rule, gated_mlp, keep, linear, lm_head, o_out, qkv_rules
from hdex_jax.config import ModelConfig

MODEL_TYPES = ("gemma",)

# GemmaConfig's and Gemma2Config's defaults, which transformers uses when config.json leaves a key out.
DEFAULT_HEAD_DIM = 256
DEFAULT_RMS_NORM_EPS = 1e-6


# The fixed fields of every Gemma GGUF architecture.
GGUF_FIXED = {**gguf_rules.ROPE_SILU, "activation": "gelu_tanh"}


def one_plus(x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """A Gemma RMSNorm weight `w` -> the canonical scale `1 + w` (exact in float32, see the module docstring)."""
    return x + np.float32(1.0)


def head_dim(hf: Mapping[str, Any], source: str) -> int:
    """`head_dim`, GemmaConfig's default when absent (transformers then uses 256, not hidden / heads)."""
    value = hf.get("head_dim", DEFAULT_HEAD_DIM)
    if value is None:
        raise CheckpointError(f"{source}: 'head_dim' is null, which model_type {hf.get('model_type')!r} "
                              f"does not allow")
    return int(value)


def refuse_bidirectional(hf: Mapping[str, Any], source: str) -> None:
    """The canonical model is causal; `use_bidirectional_attention` (EmbeddingGemma) is not."""
    if hf.get("use_bidirectional_attention"):
        raise CheckpointError(f"{source}: use_bidirectional_attention=true is not supported (hdex_jax "
                              f"generates with causal attention)")


def _activation(hf: Mapping[str, Any], source: str) -> str:
    """The MLP activation as transformers 5 resolves it for Gemma: `hidden_act`, where the legacy "gelu" of the
    original releases means the tanh approximation. Older transformers read `hidden_activation` instead, so a
    config where the two disagree is ambiguous and refused."""
    name = hf.get("hidden_act") or "gelu_pytorch_tanh"
    if name == "gelu":
        name = "gelu_pytorch_tanh"
    legacy = hf.get("hidden_activation")
    if legacy is not None and legacy != name:
        raise CheckpointError(f"{source}: hidden_act={hf.get('hidden_act')!r} and hidden_activation={legacy!r} "
                              f"disagree (transformers versions read different keys)")
    return activation(name, "hidden_act", source)


def gemma_config(hf: Mapping[str, Any], source: str, act: str) -> ModelConfig:
    """The ModelConfig fields Gemma and Gemma 2 share, with the MLP activation `act` (already mapped)."""
    refuse_bidirectional(hf, source)
    hidden = int(require(hf, "hidden_size", source))
    heads = int(require(hf, "num_attention_heads", source))
    attention_bias = bool(hf.get("attention_bias", False))
    theta, scaling, _ = hf_rope(hf, source)
    return ModelConfig(
        model_type=require(hf, "model_type", source),
        **hf_sizes(hf, source, hidden_size=hidden, num_heads=heads, head_dim=head_dim(hf, source)),
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", DEFAULT_RMS_NORM_EPS)),
        embed_scale=float(np.float32(math.sqrt(hidden))),
        positions="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        activation=act,
        gated_mlp=True,
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig of a Gemma `config.json` dict; `source` names the file in errors."""
    return gemma_config(hf, source, _activation(hf, source))


def gemma_rules(cfg: ModelConfig, norms: Mapping[str, str]) -> list[Rule]:
    """The Gemma tensor layout, with `norms` mapping each per-layer norm's HF name to its canonical name."""
    layer = r"model\.layers\.(?P<layer>\d+)\."
    return [
        Rule(r"model\.embed_tokens\.weight", "embed", keep),
        *(Rule(layer + rf"{hf_name}\.weight", f"layers/{name}/scale", one_plus) for hf_name, name in norms.items()),
        *qkv_rules(layer),
        *linear(layer + r"self_attn\.o_proj", "layers/attn/o", o_out),
        *gated_mlp(layer),
        Rule(r"model\.norm\.weight", "final_norm/scale", one_plus),
        lm_head(cfg),
    ]


def gguf_fields(meta: gguf_rules.GGUFMeta) -> dict[str, Any]:
    # Gemma multiplies embeddings by sqrt(hidden_size); llama.cpp hard-codes the same.
    return {"embed_scale": float(meta.get("embedding_length", required=True)) ** 0.5}


def gguf_query_scale(meta: gguf_rules.GGUFMeta, large_layers: int) -> float | None:
    """Gemma 2's and 3's query scale, which GGUF files do not store: as llama.cpp assumes, (hidden / heads) ** -0.5
    for the one size with `large_layers` layers (the 27B models), head_dim ** -0.5 (None) for the others."""
    hidden = int(meta.get("embedding_length", required=True))
    heads = int(meta.get("attention.head_count", required=True))
    layers = int(meta.get("block_count", required=True))
    return (hidden / heads) ** -0.5 if layers == large_layers else None


def key_map(cfg: ModelConfig) -> list[Rule]:
    """HF tensor names of Gemma -> canonical names; every RMSNorm weight becomes `1 + w`."""
    return gemma_rules(cfg, {"input_layernorm": "ln1", "post_attention_layernorm": "ln2"})


FAMILY = Family(
    model_types=MODEL_TYPES,
    example="google/gemma-2b",
    mechanisms=("RMSNorm x (1 + w) (converted to a scale w + 1)", "embedding x sqrt(hidden_size)",
                "tanh-GELU-gated MLP", "explicit head_dim", "rotate-half RoPE", "multi-query / grouped-query attention",
                "tied head"),
    config_from_hf=config_from_hf,
    key_map=key_map,
    limits=("use_bidirectional_attention, and hidden_act / hidden_activation that disagree are refused; "
            "rope scaling: linear, dynamic, yarn, llama3 and longrope (other types refused, naming them)"),
    gguf={"gemma": gguf_rules.GGUFArch(
        fixed=GGUF_FIXED,
        key_map=gguf_rules.rules(gguf_rules.embeddings(lm_head=False), gguf_rules.sequential_norms(),
                                 gguf_rules.attention(), gguf_rules.mlp(gated=True)),
        from_file=gguf_fields)},
)
