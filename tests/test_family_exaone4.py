"""EXAONE 4: parity of a tiny random checkpoint with transformers on 1 and 4 devices, hybrid: a sliding layer
(window 4, shorter than the prompts) with RoPE and a global layer without positions; configs without a window."""

from __future__ import annotations

import pytest
import transformers

import converters
from tests.family_parity import Reference, save_random_model

_SIZES = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, intermediate_size=96, max_position_embeddings=128,
              num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    config = transformers.Exaone4Config(**_SIZES, sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    return Reference.of(save_random_model(config, tmp_path_factory.mktemp("exaone4")))


@pytest.mark.parametrize("num_device", [1, 4])
def test_parity(reference: Reference, num_device: int):
    reference.check(num_device)


def test_layers_of_the_config():
    hybrid = {**transformers.Exaone4Config(**{**_SIZES, "num_hidden_layers": 4}, sliding_window=8).to_dict(),
              "layer_types": None}
    cfg = converters.config_from_hf(hybrid)
    assert (cfg.sliding_window, cfg.sliding_layers) == (8, (True, True, True, False))
    assert cfg.rope_layers == cfg.sliding_layers and (cfg.qk_norm, cfg.input_norms) == ("head", False)
    cfg = converters.config_from_hf({**hybrid, "sliding_window": None})
    assert (cfg.sliding_window, cfg.sliding_layers, cfg.rope_layers) == (None, (), ())
