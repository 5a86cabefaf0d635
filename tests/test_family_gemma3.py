"""Gemma 3 text: parity of a tiny random checkpoint with transformers on 1 and 4 devices (4 query / 2 KV heads:
4 devices replicate KV heads and their k norms), with a sliding layer (window 4, shorter than the prompts) and a
global one whose RoPE thetas differ and whose global RoPE is linearly scaled; the layer pattern and RoPE of
configs written before `layer_types` and `rope_parameters`."""

from __future__ import annotations

import pytest
import transformers

import converters
from converters import CheckpointError
from tests.family_parity import Reference, save_random_model

_SIZES = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, intermediate_size=96, max_position_embeddings=128,
              num_attention_heads=4, num_key_value_heads=2, head_dim=32, bos_token_id=1, eos_token_id=2,
              pad_token_id=0, query_pre_attn_scalar=20, sliding_window=4,
              layer_types=["sliding_attention", "full_attention"])
_ROPE = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4},
         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    config = transformers.Gemma3TextConfig(**_SIZES, rope_parameters=_ROPE)
    return Reference.of(save_random_model(config, tmp_path_factory.mktemp("gemma3")))


@pytest.mark.parametrize("num_device", [1, 4])
def test_parity(reference: Reference, num_device: int):
    reference.check(num_device)


def test_config_without_layer_types_or_rope_parameters():
    """Five sliding layers to one global by default; the older top-level rope keys."""
    sizes = {**_SIZES, "num_hidden_layers": 12, "layer_types": None}
    hf = {**transformers.Gemma3TextConfig(**sizes).to_dict(),
          "rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    del hf["layer_types"], hf["rope_parameters"]
    cfg = converters.config_from_hf(hf)
    assert cfg.sliding_layers == tuple((i + 1) % 6 != 0 for i in range(12))
    assert (cfg.rope_theta, cfg.rope_local_theta) == (1e6, 1e4)
    assert dict(cfg.rope_scaling) == {"rope_type": "linear", "factor": 8.0}
    assert (cfg.qk_norm, cfg.post_norms, cfg.attention_scale) == ("head", True, 20 ** -0.5)


def test_scaled_local_rope_is_refused():
    hf = transformers.Gemma3TextConfig(**_SIZES, rope_parameters=_ROPE).to_dict()
    hf["rope_parameters"]["sliding_attention"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 100.0}
    with pytest.raises(CheckpointError, match="sliding_attention"):
        converters.config_from_hf(hf)
