"""Gemma 2 checkpoints (google/gemma-2-*, model_type "gemma2"): Gemma (see gemma.py: `1 + w` norms, scaled
embedding, tanh-GELU MLP, explicit head_dim, tied head) plus

- a norm on each sublayer's output before the residual add. Beware the names: Gemma 2's
  `post_attention_layernorm` normalises the attention *output* (canonical `ln1_post`), unlike Llama's and
  Gemma's, which is the pre-MLP norm; the pre-MLP norm is `pre_feedforward_layernorm` (`ln2`) and the MLP
  output's is `post_feedforward_layernorm` (`ln2_post`);
- attention scores scaled by `query_pre_attn_scalar ** -0.5` instead of `head_dim ** -0.5`;
- tanh soft-capping of attention scores (`attn_logit_softcapping`) and final logits (`final_logit_softcapping`);
- a sliding window on some layers only: `layer_types`, or, in configs without it, every other layer starting
  with layer 0 (transformers' rule, also that of the original release).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from converters import gguf_rules
from converters.errors import CheckpointError
from converters.family import Family
from converters.families.gemma import GGUF_FIXED, gemma_config, gemma_rules, gguf_fields, gguf_query_scale
from converters.hf_config import activation
from converters.keymap import Rule
from hdex_jax.config import ModelConfig

MODEL_TYPES = ("gemma2",)

# Gemma2Config's defaults, which transformers uses when config.json leaves a key out; llama.cpp assumes the same
# soft-caps and window when a GGUF file leaves them out.
DEFAULT_QUERY_PRE_ATTN_SCALAR = 256
DEFAULT_SLIDING_WINDOW = 4096
DEFAULT_ATTN_SOFTCAP = 50.0
DEFAULT_FINAL_SOFTCAP = 30.0
DEFAULT_ACTIVATION = "gelu_pytorch_tanh"

_SLIDING, _FULL = "sliding_attention", "full_attention"
# Gemma-2-27B's layer count: the one size whose query scale is (hidden / heads) ** -0.5 instead of head_dim ** -0.5.
_27B_LAYERS = 46


def _softcap(hf: Mapping[str, Any], key: str, default: float) -> float | None:
    """A soft-capping value; null (or absent from a config that spells it null) disables it, as in transformers."""
    value = hf.get(key, default)
    return None if value is None else float(value)


def _sliding(hf: Mapping[str, Any], num_layers: int, source: str) -> tuple[int | None, tuple[bool, ...]]:
    """(window, which layers use it) from `layer_types`, or transformers' alternation when it is absent."""
    layer_types = hf.get("layer_types") or [_SLIDING if (i + 1) % 2 else _FULL for i in range(num_layers)]
    if len(layer_types) != num_layers or not set(layer_types) <= {_SLIDING, _FULL}:
        raise CheckpointError(f"{source}: layer_types={layer_types} should list {_SLIDING!r} or {_FULL!r} for "
                              f"each of the {num_layers} layers")
    sliding = tuple(t == _SLIDING for t in layer_types)
    if not any(sliding):
        return None, ()
    window = hf.get("sliding_window", DEFAULT_SLIDING_WINDOW)
    if window is None:
        raise CheckpointError(f"{source}: 'sliding_window' is null, but layer_types has sliding layers")
    return int(window), sliding


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig of a Gemma 2 `config.json` dict; `source` names the file in errors."""
    # Gemma2MLP reads `hidden_activation`; the `hidden_act` some config.json files also carry is unused.
    act = activation(hf.get("hidden_activation") or DEFAULT_ACTIVATION, "hidden_activation", source)
    cfg = gemma_config(hf, source, act)
    window, sliding_layers = _sliding(hf, cfg.num_layers, source)
    scalar = hf.get("query_pre_attn_scalar", DEFAULT_QUERY_PRE_ATTN_SCALAR)
    if scalar is None:
        raise CheckpointError(f"{source}: 'query_pre_attn_scalar' is null; Gemma 2 scales attention scores by "
                              f"its inverse square root")
    return dataclasses.replace(
        cfg,
        post_norms=True,
        attention_scale=float(scalar) ** -0.5,
        attn_softcap=_softcap(hf, "attn_logit_softcapping", DEFAULT_ATTN_SOFTCAP),
        final_softcap=_softcap(hf, "final_logit_softcapping", DEFAULT_FINAL_SOFTCAP),
        sliding_window=window,
        sliding_layers=sliding_layers,
    )


def key_map(cfg: ModelConfig) -> list[Rule]:
    """HF tensor names of Gemma 2 -> canonical names; every RMSNorm weight becomes `1 + w`."""
    return gemma_rules(cfg, {
        "input_layernorm": "ln1",
        "post_attention_layernorm": "ln1_post",
        "pre_feedforward_layernorm": "ln2",
        "post_feedforward_layernorm": "ln2_post",
    })


def _gguf_fields(meta: gguf_rules.GGUFMeta) -> dict[str, Any]:
    """Gemma 2 GGUF: the embedding scale, soft-caps, a sliding window on even layers (layers 0, 2, ...) and the
    query scale (`gguf_query_scale`)."""
    layers = int(meta.get("block_count", required=True))
    return {
        **gguf_fields(meta),
        "attn_softcap": float(meta.get("attn_logit_softcapping", DEFAULT_ATTN_SOFTCAP)),
        "final_softcap": float(meta.get("final_logit_softcapping", DEFAULT_FINAL_SOFTCAP)),
        "sliding_window": int(meta.get("attention.sliding_window", DEFAULT_SLIDING_WINDOW)),
        "sliding_layers": tuple(i % 2 == 0 for i in range(layers)),
        "attention_scale": gguf_query_scale(meta, _27B_LAYERS),
    }


FAMILY = Family(
    model_types=MODEL_TYPES,
    example="google/gemma-2-2b-it",
    mechanisms=("Gemma's (1 + w) RMSNorm, embedding scale, tanh-GELU MLP and tied head",
                "pre and post norms around attention and MLP", "query_pre_attn_scalar attention scale",
                "attention and final logit soft-capping", "sliding window on alternating layers"),
    config_from_hf=config_from_hf,
    key_map=key_map,
    limits=("use_bidirectional_attention and layer types other than sliding/full are refused; "
            "rope scaling: linear, dynamic, yarn, llama3 and longrope (other types refused, naming them)"),
    gguf={"gemma2": gguf_rules.GGUFArch(
        fixed={**GGUF_FIXED, "post_norms": True},
        key_map=gguf_rules.rules(gguf_rules.embeddings(lm_head=False), gguf_rules.sequential_norms(),
                                 gguf_rules.attention(), gguf_rules.mlp(gated=True), gguf_rules.post_norms()),
        from_file=_gguf_fields,
        limits="the query scale is not in GGUF files: head_dim ** -0.5, or (hidden / heads) ** -0.5 for 46 layers "
               "(Gemma-2-27B), as llama.cpp assumes")},
)
