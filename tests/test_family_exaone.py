"""EXAONE 3: parity of a tiny random checkpoint with transformers (which runs it as a Llama and saves EXAONE's own
tensor names) on 1 and 3 devices, with EXAONE 3.5's llama3 rope scaling; the original config keys."""

from __future__ import annotations

import pytest
import transformers

import converters
from tests.family_parity import Reference, save_random_model

_SIZES = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, intermediate_size=96, max_position_embeddings=128,
              num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 32})


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    directory = save_random_model(transformers.ExaoneConfig(**_SIZES), tmp_path_factory.mktemp("exaone"))
    assert (directory / "model.safetensors").is_file()
    return Reference.of(directory)


@pytest.mark.parametrize("num_device", [1, 3])
def test_parity(reference: Reference, num_device: int):
    reference.check(num_device)


def test_original_config_keys():
    """The Hub's EXAONE configs name layers, epsilon and activation their own way."""
    hf = transformers.ExaoneConfig(**_SIZES).to_dict()
    hf["num_layers"], hf["layer_norm_epsilon"], hf["activation_function"] = 3, 1e-3, "silu"
    del hf["num_hidden_layers"], hf["rms_norm_eps"], hf["hidden_act"]
    cfg = converters.config_from_hf(hf)
    assert (cfg.num_layers, cfg.norm_eps, cfg.activation) == (3, 1e-3, "silu")
