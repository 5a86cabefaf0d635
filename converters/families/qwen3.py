"""Qwen3 checkpoints (Qwen/Qwen3-*, model_type "qwen3"): the Llama tensor layout (see llama.py) plus an RMSNorm
of each query and key head over head_dim before RoPE (`self_attn.{q,k}_norm`, one `[head_dim]` scale shared by
the heads). head_dim is explicit (128 for every size, apart from hidden / heads), there are no biases unless
`attention_bias`, and a sliding window applies only with `use_sliding_window`, on the layers `layer_types` (or
`max_window_layers`) marks, as for Qwen2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from converters import gguf_rules
from converters.families import llama
from converters.family import Family
from converters.keymap import Rule, qk_norms
from hdex_jax.config import ModelConfig

MODEL_TYPES = ("qwen3",)


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig of a Qwen3 `config.json` dict; `source` names the file in errors."""
    cfg = llama.config_from_hf(hf, source)
    # Qwen3Model slides as Qwen2Model does (use_sliding_window, then layer_types or max_window_layers).
    window, sliding_layers = llama._sliding_window({**hf, "model_type": "qwen2"}, cfg.num_layers)
    return dataclasses.replace(cfg, qk_norm="head", sliding_window=window, sliding_layers=sliding_layers)


def key_map(cfg: ModelConfig) -> list[Rule]:
    """HF tensor names of Qwen3 -> canonical names: Llama's and the q/k norms."""
    return [*llama.key_map(cfg), *qk_norms(r"model\.layers\.(?P<layer>\d+)\.")]


FAMILY = Family(
    model_types=MODEL_TYPES,
    example="Qwen/Qwen3-0.6B",
    mechanisms=("per-head q/k RMSNorm before RoPE", "RMSNorm", "rotate-half RoPE", "SiLU-gated MLP",
                "grouped-query attention", "explicit head_dim", "sliding window on some layers (use_sliding_window)"),
    config_from_hf=config_from_hf,
    key_map=key_map,
    limits=llama.FAMILY.limits,
    # GGUF: the q/k norms as Hugging Face stores them (`[head_dim]`).
    gguf={"qwen3": gguf_rules.GGUFArch(
        fixed={**gguf_rules.ROPE_SILU, "qk_norm": "head"},
        key_map=gguf_rules.rules(gguf_rules.embeddings(), gguf_rules.sequential_norms(), gguf_rules.attention(),
                                 gguf_rules.qk_norms(), gguf_rules.mlp(gated=True)))},
)
