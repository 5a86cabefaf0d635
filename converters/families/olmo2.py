"""OLMo 2 checkpoints (allenai/OLMo-2-*, model_type "olmo2"): the Llama tensor layout (see llama.py) with the norms
moved. The sublayers read the residual stream itself and only their outputs are normed before the residual add
(`post_attention_layernorm` -> canonical `ln1_post`, `post_feedforward_layernorm` -> `ln2_post`, no input norms),
and q and k are RMS-normed over all heads of a token at once, before RoPE (`self_attn.{q,k}_norm` of
`[heads * head_dim]`; on N devices the sum of squares is summed over the devices).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from converters import gguf_rules
from converters.families import llama
from converters.family import Family
from converters.keymap import Rule, gated_mlp, ignore, keep, linear, lm_head, o_out, qk_norms, qkv_rules
from hdex_jax.config import ModelConfig

MODEL_TYPES = ("olmo2",)


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig of an OLMo 2 `config.json` dict; `source` names the file in errors."""
    cfg = llama.config_from_hf(hf, source)
    return dataclasses.replace(cfg, input_norms=False, post_norms=True, qk_norm="all")


def key_map(cfg: ModelConfig) -> list[Rule]:
    """HF tensor names of OLMo 2 -> canonical names."""
    layer = r"model\.layers\.(?P<layer>\d+)\."
    return [
        Rule(r"model\.embed_tokens\.weight", "embed", keep),
        Rule(layer + r"post_attention_layernorm\.weight", "layers/ln1_post/scale", keep),
        Rule(layer + r"post_feedforward_layernorm\.weight", "layers/ln2_post/scale", keep),
        *qkv_rules(layer),
        *qk_norms(layer),
        *linear(layer + r"self_attn\.o_proj", "layers/attn/o", o_out),
        *gated_mlp(layer),
        Rule(r"model\.norm\.weight", "final_norm/scale", keep),
        ignore(r"model\.(?:layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq"),
        lm_head(cfg),
    ]


FAMILY = Family(
    model_types=MODEL_TYPES,
    example="allenai/OLMo-2-0425-1B",
    mechanisms=("norms on the sublayer outputs only (no input norms)", "q/k RMSNorm over all heads before RoPE",
                "RMSNorm", "rotate-half RoPE", "SiLU-gated MLP", "grouped-query attention"),
    config_from_hf=config_from_hf,
    key_map=key_map,
    limits=llama.FAMILY.limits,
    # GGUF: the q/k norms as Hugging Face stores them (`[heads * head_dim]`, over all heads).
    gguf={"olmo2": gguf_rules.GGUFArch(
        fixed={**gguf_rules.ROPE_SILU, "qk_norm": "all", "input_norms": False, "post_norms": True},
        key_map=gguf_rules.rules(gguf_rules.embeddings(), gguf_rules.attention(), gguf_rules.qk_norms(),
                                 gguf_rules.mlp(gated=True), gguf_rules.post_norms()))},
)
