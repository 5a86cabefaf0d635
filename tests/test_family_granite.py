"""Granite: parity of a tiny random checkpoint with transformers on 1 and 4 devices, every multiplier far from 1."""

from __future__ import annotations

import pytest
import transformers

from tests.family_parity import Reference, save_random_model


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    config = transformers.GraniteConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                                        max_position_embeddings=128, num_attention_heads=4, num_key_value_heads=2,
                                        bos_token_id=1, eos_token_id=2, pad_token_id=0, embedding_multiplier=12.0,
                                        residual_multiplier=0.22, attention_multiplier=0.5, logits_scaling=0.25)
    return Reference.of(save_random_model(config, tmp_path_factory.mktemp("granite")))


@pytest.mark.parametrize("num_device", [1, 4])
def test_parity(reference: Reference, num_device: int):
    reference.check(num_device)
