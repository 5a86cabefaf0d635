"""GPT-2, GPTBigCode, GPT-J and GPT-NeoX: parity of tiny random checkpoints with transformers on 1, 3 and 4
devices, and the converter details the parity runs do not reach (Hub-style tensor names, refused options)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers

import converters
from converters.errors import CheckpointError
from converters.registry import get_converter
from tests.family_parity import Reference, save_random_model

# Tiny sizes: 4 heads, so 3 and 4 devices pad heads; ids 0-2 are pad, bos, eos.
TOKENS = dict(vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
GPT_SIZES = dict(n_embd=64, n_layer=2, n_head=4, n_inner=96, n_positions=128, **TOKENS)
NEOX_SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                  max_position_embeddings=128, **TOKENS)

# Each family with its distinctive mechanism switched on: GPT-J and GPT-NeoX rotate only part of each head
# (GPT-J's interleaved pairs are permuted by the converter), GPTBigCode in both c_attn layouts, GPT-NeoX with
# its parallel and its sequential residual.
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(**GPT_SIZES),
    "gpt_bigcode": lambda: transformers.GPTBigCodeConfig(multi_query=True, **GPT_SIZES),
    "gpt_bigcode-mha": lambda: transformers.GPTBigCodeConfig(multi_query=False, **GPT_SIZES),
    "gptj": lambda: transformers.GPTJConfig(rotary_dim=8, **GPT_SIZES),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(rotary_pct=0.5, use_parallel_residual=True, **NEOX_SIZES),
    "gpt_neox-sequential": lambda: transformers.GPTNeoXConfig(rotary_pct=0.5, use_parallel_residual=False,
                                                              **NEOX_SIZES),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def reference(request, tmp_path_factory) -> Reference:
    """transformers' greedy generation of a tiny random checkpoint of each family."""
    directory = tmp_path_factory.mktemp(request.param)
    return Reference.of(save_random_model(CONFIGS[request.param](), directory))


@pytest.mark.parametrize("num_device", [1, 3, 4])
def test_parity(reference: Reference, num_device: int) -> None:
    reference.check(num_device)
