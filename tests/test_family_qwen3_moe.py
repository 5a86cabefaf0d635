"""Qwen3-MoE: parity of tiny random checkpoints with transformers on 1 and 3 devices (the experts' 40 features are
padded on 3): 8 experts, top-2, so that decode's (row, expert) pairs are fewer than the experts and only the chosen
ones are read, while the prompt pass computes every expert; without norm_topk_prob (1 device) and with it (3)."""

from __future__ import annotations

import pytest
import transformers

import converters
from converters import CheckpointError
from tests.family_parity import Reference, save_random_model

_SIZES = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, intermediate_size=96, max_position_embeddings=128,
              num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              num_experts=8, num_experts_per_tok=2, moe_intermediate_size=40)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """norm_topk_prob -> transformers' greedy generation of that tiny random checkpoint, saved once per module."""
    made: dict[bool, Reference] = {}

    def get(norm_topk_prob: bool) -> Reference:
        if norm_topk_prob not in made:
            config = transformers.Qwen3MoeConfig(**_SIZES, norm_topk_prob=norm_topk_prob)
            made[norm_topk_prob] = Reference.of(save_random_model(config, tmp_path_factory.mktemp("qwen3_moe")))
        return made[norm_topk_prob]

    return get


@pytest.mark.parametrize("norm_topk_prob, num_device", [(False, 1), (True, 3)])
def test_parity(reference, norm_topk_prob: bool, num_device: int):
    reference(norm_topk_prob).check(num_device)


def test_dense_layers_are_refused():
    hf = transformers.Qwen3MoeConfig(**_SIZES, mlp_only_layers=[1]).to_dict()
    with pytest.raises(CheckpointError, match="mlp_only_layers"):
        converters.config_from_hf(hf)
