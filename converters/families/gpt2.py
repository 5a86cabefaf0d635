"""GPT-2 checkpoints (openai-community/gpt2*, distilgpt2, DialoGPT, ...): learned positions, LayerNorm,
gelu_new, biases everywhere, an LM head tied to the embedding.

The projections are `Conv1D` modules, whose weights are stored `[in, out]` (the transpose of nn.Linear), and
q, k and v are one fused `c_attn` of width 3 * hidden, split on its output axis as [q | k | v].
The config names its sizes the GPT-2 way (`n_embd`, `n_layer`, `n_head`, `n_positions`, `n_inner`);
GPTBigCode and GPT-J share those names, so `gpt_sizes` is used by their converters too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from converters import gguf_rules
from converters.errors import CheckpointError
from converters.family import Family
from converters.hf_config import activation, hf_sizes
from converters.keymap import QKV, Rule, ignore, keep, linear, lm_head, norm
from hdex_jax.config import ModelConfig

MODEL_TYPES = ("gpt2",)

# GPT2Config's default; configs written by old transformers versions may leave the key out.
LAYER_NORM_EPS = 1e-5

# The GPT-2 config names of the sizes, and the generic names transformers also accepts (attribute_map).
_SIZE_KEYS = {
    "hidden_size": ("n_embd", "hidden_size"),
    "num_layers": ("n_layer", "num_hidden_layers"),
    "num_heads": ("n_head", "num_attention_heads"),
    "max_position_embeddings": ("n_positions", "max_position_embeddings"),
}


def gpt_sizes(hf: Mapping[str, Any], source: str) -> dict[str, int]:
    """hidden_size, num_layers, num_heads, head_dim, intermediate_size and max_position_embeddings of a
    GPT-2-style config, which may use either the GPT-2 names or the generic ones."""
    sizes = {}
    for field, keys in _SIZE_KEYS.items():
        value = next((hf[k] for k in keys if hf.get(k) is not None), None)
        if value is None:
            raise CheckpointError(f"{source} has no {keys[0]!r} (or {keys[1]!r}), which model_type "
                                  f"{hf.get('model_type')!r} requires")
        sizes[field] = int(value)
    if sizes["hidden_size"] % sizes["num_heads"]:
        raise CheckpointError(f"{source}: n_embd={sizes['hidden_size']} is not a multiple of "
                              f"n_head={sizes['num_heads']}")
    sizes["head_dim"] = sizes["hidden_size"] // sizes["num_heads"]
    # The MLP is 4 * hidden wide unless `n_inner` says otherwise.
    sizes["intermediate_size"] = int(hf.get("n_inner") or 4 * sizes["hidden_size"])
    return sizes


def refuse_cross_attention(hf: Mapping[str, Any], source: str) -> None:
    """Cross-attention blocks (an encoder-decoder use of the family) have no place in a decoder-only model."""
    if hf.get("add_cross_attention"):
        raise CheckpointError(f"{source}: add_cross_attention=true (cross-attention layers) is not supported")


def attention_scale(hf: Mapping[str, Any]) -> float | None:
    """`scale_attn_weights=false` means unscaled scores; otherwise the default head_dim ** -0.5 (None)."""
    return None if hf.get("scale_attn_weights", True) else 1.0


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig of a GPT-2 `config.json` dict; `source` names the file in errors."""
    if hf.get("scale_attn_by_inverse_layer_idx"):
        # A per-layer score scale 1 / (layer + 1): the canonical model has one scale for all layers.
        raise CheckpointError(f"{source}: scale_attn_by_inverse_layer_idx=true is not supported")
    refuse_cross_attention(hf, source)
    sizes = gpt_sizes(hf, source)
    # `reorder_and_upcast_attn` only changes the float16 numerics of the same attention, so it is accepted.
    return ModelConfig(
        model_type="gpt2",
        **hf_sizes(hf, source, num_kv_heads=sizes["num_heads"], **sizes),
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_epsilon", LAYER_NORM_EPS)),
        positions="learned",
        attention_scale=attention_scale(hf),
        activation=activation(hf.get("activation_function", "gelu_new"), "activation_function", source),
        gated_mlp=False,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def _split_qkv(x: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`c_attn` weight `[D, 3D]` (Conv1D: [in, out]) or bias `[3D]` -> q, k, v as `[D, H, hd]` / `[H, hd]`."""
    width = cfg.num_heads * cfg.head_dim
    if x.shape[-1] != 3 * width:
        raise ValueError(f"the fused q/k/v axis should be 3 * {width} wide")
    return tuple(part.reshape(*x.shape[:-1], cfg.num_heads, cfg.head_dim) for part in np.split(x, 3, axis=-1))


def _o_conv1d(x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Output projection `c_proj` `[H*hd, D]` (Conv1D: [in, out]) -> `[H, hd, D]`."""
    return x.reshape(cfg.num_heads, cfg.head_dim, x.shape[-1])


def key_map(cfg: ModelConfig) -> list[Rule]:
    """HF tensor names of GPT-2 -> canonical names. The `transformer.` prefix is optional: the original
    openai-community files were saved from GPT2Model ("h.0.…"), newer ones from GPT2LMHeadModel."""
    top = r"(?:transformer\.)?"
    layer = top + r"h\.(?P<layer>\d+)\."
    return [
        Rule(top + r"wte\.weight", "embed", keep),
        Rule(top + r"wpe\.weight", "pos_embed", keep),
        *norm(layer + r"ln_1", "layers/ln1"),
        *linear(layer + r"attn\.c_attn", QKV, _split_qkv, _split_qkv),
        *linear(layer + r"attn\.c_proj", "layers/attn/o", _o_conv1d),
        *norm(layer + r"ln_2", "layers/ln2"),
        # Conv1D weights are already [in, out], the canonical orientation.
        *linear(layer + r"mlp\.c_fc", "layers/mlp/up", keep),
        *linear(layer + r"mlp\.c_proj", "layers/mlp/down", keep),
        *norm(top + r"ln_f", "final_norm"),
        # Old files saved the causal mask (`attn.bias`) and its fill value (`attn.masked_bias`) as buffers.
        ignore(layer + r"attn\.(?:masked_)?bias"),
        lm_head(cfg),
    ]


FAMILY = Family(
    model_types=MODEL_TYPES,
    example="openai-community/gpt2",
    mechanisms=("learned positions", "LayerNorm", "gelu_new MLP", "biases", "fused c_attn (Conv1D, [in, out])",
                "tied LM head"),
    config_from_hf=config_from_hf,
    key_map=key_map,
    limits="scale_attn_by_inverse_layer_idx and add_cross_attention are refused",
    # GGUF: the convert script transposes the Conv1D weights, so `attn_qkv` is `[3D, D]`, q/k/v stacked on rows.
    gguf={"gpt2": gguf_rules.GGUFArch(
        fixed={"norm": "layernorm", "positions": "learned", "activation": "gelu_tanh", "gated_mlp": False},
        key_map=gguf_rules.rules(gguf_rules.embeddings(), [Rule(r"position_embd\.weight", "pos_embed", keep)],
                                 gguf_rules.sequential_norms(), gguf_rules.fused_attention(),
                                 gguf_rules.mlp(gated=False)))},
)
