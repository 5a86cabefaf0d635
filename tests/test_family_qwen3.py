"""Qwen3: parity of a tiny random checkpoint with transformers on 1 and 3 devices (4 query / 2 KV heads, so 3
devices pad heads and their q norms), head_dim 24 apart from hidden / heads; its sliding-window options."""

from __future__ import annotations

import pytest
import transformers

import converters
from tests.family_parity import Reference, save_random_model

_SIZES = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, intermediate_size=96, max_position_embeddings=128,
              num_attention_heads=4, num_key_value_heads=2, head_dim=24, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)


def _config(**extra) -> transformers.Qwen3Config:
    return transformers.Qwen3Config(**_SIZES, **extra)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    return Reference.of(save_random_model(_config(), tmp_path_factory.mktemp("qwen3")))


@pytest.mark.parametrize("num_device", [1, 3])
def test_parity(reference: Reference, num_device: int):
    reference.check(num_device)


def test_sliding_window_on_the_layers_marked():
    hf = _config(use_sliding_window=True, sliding_window=8, max_window_layers=1).to_dict()
    cfg = converters.config_from_hf(hf)
    assert (cfg.qk_norm, cfg.sliding_window, cfg.sliding_layers) == ("head", 8, (False, True))
