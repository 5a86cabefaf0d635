"""Cohere: parity of tiny random checkpoints with transformers on 1 and 4 devices (4 replicate the KV heads):
Command-R's form (q/k biases, no q/k norm) and Command R+'s per-head q/k LayerNorm; logit_scale 0.5."""

from __future__ import annotations

import pytest
import transformers

from tests.family_parity import Reference, save_random_model

_SIZES = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, intermediate_size=96, max_position_embeddings=128,
              num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              logit_scale=0.5)
CASES = {"command-r": dict(attention_bias=True), "qk-norm": dict(use_qk_norm=True)}


@pytest.fixture(scope="module", params=sorted(CASES))
def reference(request, tmp_path_factory) -> Reference:
    config = transformers.CohereConfig(**_SIZES, **CASES[request.param])
    return Reference.of(save_random_model(config, tmp_path_factory.mktemp(request.param)))


@pytest.mark.parametrize("num_device", [1, 4])
def test_parity(reference: Reference, num_device: int):
    reference.check(num_device)
