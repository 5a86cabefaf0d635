"""Llama-layout cases the older parity tests (test_model_parity, test_multidevice) do not build: Qwen2 with a
sliding window on some layers only, against transformers on 1, 3 and 4 devices."""

import pytest
import transformers

from tests.family_parity import Reference, save_random_model


@pytest.fixture(scope="module")
def qwen2_some_layers_sliding(tmp_path_factory):
    # A window of 4 is shorter than the prompts, so the windowed layer and the full one differ.
    config = transformers.Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, use_sliding_window=True, sliding_window=4,
        layer_types=["full_attention", "sliding_attention"], bos_token_id=1, eos_token_id=2)
    return Reference.of(save_random_model(config, tmp_path_factory.mktemp("qwen2")))


@pytest.mark.parametrize("num_device", [1, 3, 4])
def test_qwen2_sliding_window_on_some_layers(qwen2_some_layers_sliding, num_device):
    qwen2_some_layers_sliding.check(num_device)
