"""Phi, Phi-3, StableLM, StarCoder2 and OLMo: parity with transformers on 1, 3 and 4 devices, and the options
their converters refuse.

Every tiny config has 4 query heads over 2 KV heads (head_dim 16), so 3 and 4 devices need head padding;
partial rotary factors and sliding windows are chosen so that they change the result within the prompts
(9 tokens + 8 generated).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

import converters
from converters.errors import CheckpointError
from tests.family_parity import Reference, save_random_model

_SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)

CONFIGS = {
    # Parallel block with one shared LayerNorm, biases everywhere (the LM head's too), gelu_new, phi-2's 0.4 of
    # each head rotated.
    "phi": lambda: transformers.PhiConfig(**_SIZES, partial_rotary_factor=0.4),
    # Non-parametric LayerNorms (no norm tensors at all), attention biases on q/k/v and o.
    "olmo": lambda: transformers.OlmoConfig(**_SIZES, attention_bias=True),
    # Fused qkv_proj and gate_up_proj, partial rotary, a window shorter than the sequences.
    "phi3": lambda: transformers.Phi3Config(**_SIZES, partial_rotary_factor=0.5, sliding_window=6),
    # LayerNorm with bias, q/k/v biases (StableLM 2), sequential residual, a quarter of each head rotated.
    "stablelm": lambda: transformers.StableLmConfig(**_SIZES, use_qkv_bias=True),
    # LayerNorm with bias, c_fc/c_proj tanh-GELU MLP with biases, tied head, sliding window.
    "starcoder2": lambda: transformers.Starcoder2Config(**_SIZES, sliding_window=5),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def reference(request, tmp_path_factory) -> Reference:
    directory = save_random_model(CONFIGS[request.param](), tmp_path_factory.mktemp(request.param))
    return Reference.of(directory)


@pytest.mark.parametrize("num_device", [1, 3, 4])
def test_parity(reference: Reference, num_device: int):
    reference.check(num_device)


def test_stablelm_parallel_residual(tmp_path):
    """`use_parallel_residual`: no post_attention_layernorm, both sublayers read input_layernorm (one device;
    the parallel block is checked on 3 and 4 devices through Phi)."""
    directory = save_random_model(transformers.StableLmConfig(**_SIZES, use_parallel_residual=True), tmp_path)
    Reference.of(directory).check(1)


def test_phi3_fused_split_matches_transformers_projections(tmp_path):
    """The split of qkv_proj and gate_up_proj gives exactly the q, k, v, gate and up transformers computes."""
    directory = save_random_model(CONFIGS["phi3"](), tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    cfg, flat = converters.load_checkpoint(directory)
    x = np.random.default_rng(0).standard_normal((3, cfg.hidden_size)).astype(np.float32)
    layer = model.model.layers[1]
    with torch.no_grad():
        qkv = layer.self_attn.qkv_proj(torch.from_numpy(x)).numpy()
        gate, up = layer.mlp.gate_up_proj(torch.from_numpy(x)).chunk(2, dim=-1)
    H, KV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    expected = {"q": qkv[:, :H * hd].reshape(3, H, hd), "k": qkv[:, H * hd:(H + KV) * hd].reshape(3, KV, hd),
                "v": qkv[:, (H + KV) * hd:].reshape(3, KV, hd)}
    for name, want in expected.items():
        np.testing.assert_allclose(np.einsum("td,dhk->thk", x, flat[f"layers/attn/{name}/w"][1]), want, atol=1e-5)
    np.testing.assert_allclose(x @ flat["layers/mlp/gate/w"][1], gate.numpy(), atol=1e-5)
    np.testing.assert_allclose(x @ flat["layers/mlp/up/w"][1], up.numpy(), atol=1e-5)


@pytest.mark.parametrize("model_type, key, value, message", [
    ("phi3", "rope_scaling", {"type": "linear", "factor": 2.0}, "rope scaling type 'linear'"),
    ("phi3", "rope_scaling", {"type": "su", "short_factor": [1.0] * 4}, "longrope.*needs long_factor"),
    ("phi", "qk_layernorm", True, "qk_layernorm=true"),
    ("stablelm", "qk_layernorm", True, "qk_layernorm=true"),
    ("olmo", "clip_qkv", 8.0, "clip_qkv=8.0"),
    ("starcoder2", "rope_parameters", {"rope_type": "proportional", "rope_theta": 1e4},
     "rope scaling type 'proportional'"),
])
def test_refused_options(model_type: str, key: str, value, message: str):
    """An option the canonical model does not implement is a CheckpointError naming the file and the option."""
    hf = {"model_type": model_type, **_SIZES, key: value}
    family = converters.get_converter(model_type)
    with pytest.raises(CheckpointError, match=f"my/config.json.*{message}"):
        family.config_from_hf(json.loads(json.dumps(hf)), "my/config.json")


@pytest.mark.parametrize("model_type, partial", [("phi", 0.5), ("stablelm", 0.25), ("phi3", 1.0)])
def test_partial_rotary_default_of_pre_v5_configs(model_type: str, partial: float):
    """A config.json written before transformers 5 (top-level rope_theta, no partial_rotary_factor) gets the
    factor the family's config class assumes, which differs per family."""
    hf = {"model_type": model_type, **_SIZES, "rope_theta": 500.0, "rope_scaling": None}
    cfg = converters.get_converter(model_type).config_from_hf(hf, "config.json")
    assert (cfg.rope_theta, cfg.partial_rotary_factor) == (500.0, partial)
