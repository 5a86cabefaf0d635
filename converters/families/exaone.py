"""EXAONE 3.0 / 3.5 checkpoints (LGAI-EXAONE/EXAONE-3.5-*, model_type "exaone"): Llama's computation (transformers
runs them with LlamaForCausalLM) under EXAONE's own tensor names (`transformer.h.N.attn.attention.q_proj`,
`mlp.c_fc_0` for the gate, `c_fc_1` for the up projection, ...) and config keys (`num_layers`,
`layer_norm_epsilon`, `activation_function`, beside the Llama names transformers writes back). EXAONE 3.5 uses
llama3 rope scaling.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from converters.families import llama
from converters.family import Family
from converters.keymap import Rule, keep, kv_bias, kv_in, linear, lm_head, o_out, q_bias, q_in, transpose
from hdex_jax.config import ModelConfig

MODEL_TYPES = ("exaone",)

# EXAONE's config keys -> the Llama keys transformers' ExaoneConfig maps them to.
_KEYS = {"num_layers": "num_hidden_layers", "layer_norm_epsilon": "rms_norm_eps", "activation_function": "hidden_act"}
# ExaoneConfig's defaults, which transformers uses when config.json leaves a key out.
DEFAULT_ROPE_THETA = 5e5
DEFAULT_RMS_NORM_EPS = 1e-5


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig of an EXAONE 3 `config.json` dict; `source` names the file in errors."""
    llama_keys = {"rope_theta": DEFAULT_ROPE_THETA, "rms_norm_eps": DEFAULT_RMS_NORM_EPS, **hf}
    llama_keys.update({new: hf[old] for old, new in _KEYS.items() if old in hf})
    return llama.config_from_hf(llama_keys, source)


def key_map(cfg: ModelConfig) -> list[Rule]:
    """HF tensor names of EXAONE 3 -> canonical names."""
    layer = r"transformer\.h\.(?P<layer>\d+)\."
    attn = layer + r"attn\.attention\."
    return [
        Rule(r"transformer\.wte\.weight", "embed", keep),
        Rule(layer + r"ln_1\.weight", "layers/ln1/scale", keep),
        Rule(layer + r"ln_2\.weight", "layers/ln2/scale", keep),
        *linear(attn + r"q_proj", "layers/attn/q", q_in, q_bias),
        *linear(attn + r"k_proj", "layers/attn/k", kv_in, kv_bias),
        *linear(attn + r"v_proj", "layers/attn/v", kv_in, kv_bias),
        *linear(attn + r"out_proj", "layers/attn/o", o_out),
        Rule(layer + r"mlp\.c_fc_0\.weight", "layers/mlp/gate/w", transpose),
        Rule(layer + r"mlp\.c_fc_1\.weight", "layers/mlp/up/w", transpose),
        Rule(layer + r"mlp\.c_proj\.weight", "layers/mlp/down/w", transpose),
        Rule(r"transformer\.ln_f\.weight", "final_norm/scale", keep),
        lm_head(cfg),
    ]


FAMILY = Family(
    model_types=MODEL_TYPES,
    example="LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct",
    mechanisms=("EXAONE's tensor names and config keys over Llama's computation", "RMSNorm",
                "rotate-half RoPE (llama3 scaling in 3.5)", "SiLU-gated MLP", "grouped-query attention"),
    config_from_hf=config_from_hf,
    key_map=key_map,
    limits=llama.FAMILY.limits,
)
