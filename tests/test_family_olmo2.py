"""OLMo 2: parity of a tiny random checkpoint with transformers on 1, 3 and 4 devices. Its q/k norm spans every
head, so both N-device layouts matter: 3 devices pad 4 query / 2 KV heads with zero heads, 4 devices replicate
each KV head twice (the norm's statistic must count neither)."""

from __future__ import annotations

import pytest
import transformers

from tests.family_parity import Reference, save_random_model


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    config = transformers.Olmo2Config(vocab_size=128, hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                                      max_position_embeddings=128, num_attention_heads=4, num_key_value_heads=2,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return Reference.of(save_random_model(config, tmp_path_factory.mktemp("olmo2")))


@pytest.mark.parametrize("num_device", [1, 3, 4])
def test_parity(reference: Reference, num_device: int):
    reference.check(num_device)
