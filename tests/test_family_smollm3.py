"""SmolLM3: parity of a tiny random checkpoint with transformers on 1 and 3 devices, layer 1 without RoPE (a
3-layer model with no_rope_layer_interval 2 would put it there too: checked on the config)."""

from __future__ import annotations

import pytest
import transformers

import converters
from tests.family_parity import Reference, save_random_model

_SIZES = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, intermediate_size=96, max_position_embeddings=128,
              num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    config = transformers.SmolLM3Config(**_SIZES, no_rope_layers=[1, 0])
    return Reference.of(save_random_model(config, tmp_path_factory.mktemp("smollm3")))


@pytest.mark.parametrize("num_device", [1, 3])
def test_parity(reference: Reference, num_device: int):
    reference.check(num_device)


def test_default_no_rope_layers_and_sliding_window():
    """Without no_rope_layers, every interval-th layer has no RoPE; with use_sliding_window those layers slide."""
    hf = transformers.SmolLM3Config(**{**_SIZES, "num_hidden_layers": 4}, no_rope_layer_interval=2,
                                    use_sliding_window=True, sliding_window=16).to_dict()
    del hf["no_rope_layers"], hf["layer_types"]
    cfg = converters.config_from_hf(hf)
    assert cfg.rope_layers == (True, False, True, False)
    assert (cfg.sliding_window, cfg.sliding_layers) == (16, (False, True, False, True))
