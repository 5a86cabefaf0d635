"""GPT-J checkpoints (EleutherAI/gpt-j-6b, and models fine-tuned from it): a parallel residual block whose
attention and MLP read the same LayerNorm (h + attn(ln1(h)) + mlp(ln1(h))), partial rotary embeddings, no
attention biases, a biased MLP, and an untied LM head with a bias.

GPT-J rotates pairs of *adjacent* features (`rotate_every_two`: features 2i and 2i+1 turn by frequency i),
while the canonical model rotates the two halves of the rotary features (`rotate_half`: i and i + r/2). The
converter permutes the first `rotary_dim` output features of every q and k head into the order
[0, 2, 4, ..., r-2, 1, 3, ..., r-1], which turns each adjacent pair into a half-split pair with the same
frequency. The same permutation of q and k leaves every score q.k unchanged, and v and the output
projection are untouched, so the model computes exactly what GPT-J computes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from converters.errors import CheckpointError
from converters.families.gpt2 import LAYER_NORM_EPS, gpt_sizes, refuse_cross_attention
from converters.family import Family
from converters.hf_config import activation, hf_sizes
from converters.keymap import Rule, compose, ignore, keep, kv_in, linear, lm_head, norm, o_out, q_in
from hdex_jax.config import ModelConfig

MODEL_TYPES = ("gptj",)

# GPT-J's sinusoids are built with a fixed base (create_sinusoidal_positions), not read from the config.
ROPE_THETA = 10000.0


def _rotary_factor(rotary_dim: int, head_dim: int) -> float:
    """The partial rotary factor f with `int(head_dim * f) == rotary_dim` (ModelConfig.rope_dim): the float
    rotary_dim / head_dim can land just below, e.g. int(47 * (6 / 47)) == 5, so step it up to the next float."""
    factor = rotary_dim / head_dim
    while int(head_dim * factor) < rotary_dim:
        factor = math.nextafter(factor, math.inf)
    return factor


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig of a GPT-J `config.json` dict; `source` names the file in errors."""
    refuse_cross_attention(hf, source)
    sizes = gpt_sizes(hf, source)
    head_dim = sizes["head_dim"]
    # `rotary_dim: null` rotates every feature of the head.
    rotary_dim = int(hf.get("rotary_dim") or head_dim)
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise CheckpointError(f"{source}: rotary_dim={rotary_dim} must be even and at most the head "
                              f"dimension {head_dim}")
    cfg = ModelConfig(
        model_type="gptj",
        **hf_sizes(hf, source, num_kv_heads=sizes["num_heads"], **sizes),
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_epsilon", LAYER_NORM_EPS)),
        parallel_residual=True,
        shared_norm=True,
        positions="rope",
        rope_theta=ROPE_THETA,
        partial_rotary_factor=_rotary_factor(rotary_dim, head_dim),
        activation=activation(hf.get("activation_function", "gelu_new"), "activation_function", source),
        gated_mlp=False,
        qkv_bias=False,
        o_bias=False,
        mlp_bias=True,
        # GPTJForCausalLM's lm_head is an nn.Linear with a bias, whether or not its weight is tied.
        lm_head_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    return cfg


def rotary_permutation(head_dim: int, rope_dim: int) -> np.ndarray:
    """Feature order of one head that turns GPT-J's adjacent rotary pairs into rotate-half pairs: the even
    then the odd rotary features, then the features that are not rotated, in place."""
    return np.concatenate([np.arange(0, rope_dim, 2), np.arange(1, rope_dim, 2), np.arange(rope_dim, head_dim)])


def _rotate_every_two_to_half(x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """q or k weight `[D, heads, hd]` with each head's features reordered by `rotary_permutation`."""
    return x[..., rotary_permutation(cfg.head_dim, cfg.rope_dim)]


def key_map(cfg: ModelConfig) -> list[Rule]:
    """HF tensor names of GPT-J -> canonical names (`transformer.` prefix optional, as for GPT-2)."""
    top = r"(?:transformer\.)?"
    layer = top + r"h\.(?P<layer>\d+)\."
    return [
        Rule(top + r"wte\.weight", "embed", keep),
        *norm(layer + r"ln_1", "layers/ln1"),
        Rule(layer + r"attn\.q_proj\.weight", "layers/attn/q/w", compose(q_in, _rotate_every_two_to_half)),
        Rule(layer + r"attn\.k_proj\.weight", "layers/attn/k/w", compose(kv_in, _rotate_every_two_to_half)),
        Rule(layer + r"attn\.v_proj\.weight", "layers/attn/v/w", kv_in),
        Rule(layer + r"attn\.out_proj\.weight", "layers/attn/o/w", o_out),
        *linear(layer + r"mlp\.fc_in", "layers/mlp/up"),
        *linear(layer + r"mlp\.fc_out", "layers/mlp/down"),
        *norm(top + r"ln_f", "final_norm"),
        Rule(r"lm_head\.bias", "lm_head/b", keep),
        # The Hub files of gpt-j-6b carry the causal mask (`attn.bias`) and its fill value as buffers.
        ignore(layer + r"attn\.(?:masked_)?bias"),
        lm_head(cfg),
    ]


FAMILY = Family(
    model_types=MODEL_TYPES,
    example="EleutherAI/gpt-j-6b",
    mechanisms=("partial RoPE (rotary_dim), interleaved pairs permuted to rotate-half at conversion",
                "parallel residual with one shared LayerNorm", "gelu_new MLP with biases", "no attention biases",
                "untied LM head with bias"),
    config_from_hf=config_from_hf,
    key_map=key_map,
    limits="add_cross_attention is refused; rotary_dim must be even",
)
