"""Granite checkpoints (ibm-granite/granite-3.*, model_type "granite"): the Llama tensor layout and config (see
llama.py) with four multipliers: the embedding times `embedding_multiplier`, each sublayer's output times
`residual_multiplier` before the residual add, attention scores scaled by `attention_multiplier` (instead of
head_dim ** -0.5) and the logits divided by `logits_scaling` (here: multiplied by its inverse).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from converters import gguf_rules
from converters.families import llama
from converters.family import Family
from hdex_jax.config import ModelConfig

MODEL_TYPES = ("granite",)

# GraniteConfig's defaults, which transformers uses when config.json leaves a key out.
DEFAULTS = {"embedding_multiplier": 1.0, "residual_multiplier": 1.0, "attention_multiplier": 1.0,
            "logits_scaling": 1.0}


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig of a Granite `config.json` dict; `source` names the file in errors."""
    cfg = llama.config_from_hf(hf, source)
    value = {key: float(hf.get(key) if hf.get(key) is not None else default) for key, default in DEFAULTS.items()}
    return dataclasses.replace(cfg, embed_scale=value["embedding_multiplier"],
                               residual_scale=value["residual_multiplier"],
                               attention_scale=value["attention_multiplier"],
                               logit_scale=1.0 / value["logits_scaling"])


def _gguf_fields(meta: gguf_rules.GGUFMeta) -> dict[str, Any]:
    """Granite's multipliers; llama.cpp's defaults (1, and head_dim ** -0.5 for attention) when absent."""
    attention = meta.get("attention.scale")
    return {"embed_scale": float(meta.get("embedding_scale", 1.0)),
            "residual_scale": float(meta.get("residual_scale", 1.0)),
            "attention_scale": None if attention is None else float(attention),
            "logit_scale": 1.0 / float(meta.get("logit_scale", 1.0))}


FAMILY = Family(
    model_types=MODEL_TYPES,
    example="ibm-granite/granite-3.3-2b-instruct",
    mechanisms=("embedding, residual, attention and logits multipliers", "RMSNorm", "rotate-half RoPE",
                "SiLU-gated MLP", "grouped-query attention"),
    config_from_hf=config_from_hf,
    key_map=llama.key_map,
    limits=llama.FAMILY.limits + "; the MoE and hybrid Granite types (granitemoe*) are not read",
    # GGUF: the Llama layout (q/k rows permuted) with four multipliers in the metadata; llama.cpp divides the
    # logits by `logit_scale` as transformers divides by `logits_scaling`.
    gguf={"granite": gguf_rules.GGUFArch(
        fixed=gguf_rules.ROPE_SILU,
        key_map=gguf_rules.rules(gguf_rules.embeddings(), gguf_rules.sequential_norms(),
                                 gguf_rules.attention(permuted=True), gguf_rules.mlp(gated=True)),
        from_file=_gguf_fields,
        permuted_qk=True)},
)
