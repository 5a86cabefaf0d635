"""OPT checkpoints (facebook/opt-*): learned positions offset by 2, LayerNorm, ReLU, biases everywhere.

opt-350m is the odd one: post-LN (`do_layer_norm_before=False`, hence no final norm) and 512-wide
embeddings projected to and from the 1024-wide residual stream (`word_embed_proj_dim`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from converters.errors import CheckpointError
from converters.family import Family
from converters.hf_config import activation, hf_sizes, require
from converters.keymap import Rule, keep, linear, lm_head, norm, o_out, qkv_rules, transpose
from hdex_jax.config import ModelConfig

MODEL_TYPES = ("opt",)

# OPTLearnedPositionalEmbedding reserves the first two rows (a fairseq padding convention).
POSITION_OFFSET = 2
# OPT uses torch.nn.LayerNorm with its default epsilon; config.json does not record it.
LAYER_NORM_EPS = 1e-5


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig of an OPT `config.json` dict; `source` names the file in errors."""
    hidden = int(require(hf, "hidden_size", source))
    heads = int(require(hf, "num_attention_heads", source))
    pre_norm = bool(hf.get("do_layer_norm_before", True))
    bias = bool(hf.get("enable_bias", True))
    if not hf.get("layer_norm_elementwise_affine", True):
        # Affine-free LayerNorms store no weights; the canonical model always has a scale and bias.
        raise CheckpointError(f"{source}: layer_norm_elementwise_affine=false is not supported")
    return ModelConfig(
        model_type="opt",
        **hf_sizes(hf, source, hidden_size=hidden, num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
                   intermediate_size=int(require(hf, "ffn_dim", source)),
                   embed_dim=int(hf.get("word_embed_proj_dim") or hidden)),
        norm="layernorm",
        norm_eps=LAYER_NORM_EPS,
        pre_norm=pre_norm,
        # OPTDecoder only builds its final LayerNorm for pre-LN models, and old checkpoints may opt out.
        final_norm=pre_norm and not hf.get("_remove_final_layer_norm", False),
        positions="learned",
        position_offset=POSITION_OFFSET,
        activation=activation(hf.get("activation_function", "relu"), "activation_function", source),
        gated_mlp=False,
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def key_map(cfg: ModelConfig) -> list[Rule]:
    """HF tensor names of OPT -> canonical names. The `model.` prefix is optional because the original
    facebook/opt files were saved from OPTModel ("decoder.…") and newer ones from OPTForCausalLM."""
    top = r"(?:model\.)?decoder\."
    layer = top + r"layers\.(?P<layer>\d+)\."
    return [
        Rule(top + r"embed_tokens\.weight", "embed", keep),
        Rule(top + r"embed_positions\.weight", "pos_embed", keep),
        Rule(top + r"project_in\.weight", "project_in", transpose),
        Rule(top + r"project_out\.weight", "project_out", transpose),
        *norm(top + r"final_layer_norm", "final_norm"),
        *norm(layer + r"self_attn_layer_norm", "layers/ln1"),
        *qkv_rules(layer),
        *linear(layer + r"self_attn\.out_proj", "layers/attn/o", o_out),
        # The per-layer "final_layer_norm" is the LayerNorm around the MLP, not the decoder's final norm.
        *norm(layer + r"final_layer_norm", "layers/ln2"),
        *linear(layer + r"fc1", "layers/mlp/up"),
        *linear(layer + r"fc2", "layers/mlp/down"),
        lm_head(cfg),
    ]


FAMILY = Family(
    model_types=MODEL_TYPES,
    example="facebook/opt-125m",
    mechanisms=("learned positions (offset 2)", "LayerNorm", "ReLU MLP", "biases", "pre-LN and post-LN (opt-350m)",
                "embedding projection (opt-350m)"),
    config_from_hf=config_from_hf,
    key_map=key_map,
    limits="layer_norm_elementwise_affine=false is refused",
)
