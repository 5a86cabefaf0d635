"""Cohere: parity of tiny random checkpoints with transformers, logit_scale 0.5: Command-R's form (q/k biases, no
q/k norm) on 1 and 4 devices (4 replicate the KV heads), Command R+'s per-head q/k LayerNorm on 4 (and its
norms)."""

from __future__ import annotations

import pytest
import transformers

from tests.family_parity import Reference, save_random_model

_SIZES = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, intermediate_size=96, max_position_embeddings=128,
              num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              logit_scale=0.5)
CASES = {"command-r": dict(attention_bias=True), "qk-norm": dict(use_qk_norm=True)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """case -> transformers' greedy generation of that tiny random checkpoint, saved once per module."""
    made: dict[str, Reference] = {}

    def get(case: str) -> Reference:
        if case not in made:
            config = transformers.CohereConfig(**_SIZES, **CASES[case])
            made[case] = Reference.of(save_random_model(config, tmp_path_factory.mktemp(case)))
        return made[case]

    return get


@pytest.mark.parametrize("case, num_device", [("command-r", 1), ("command-r", 4), ("qk-norm", 4)])
def test_parity(reference, case: str, num_device: int):
    reference(case).check(num_device)
