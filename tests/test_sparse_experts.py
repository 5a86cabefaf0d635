"""Decode of a mixture of experts reads only the chosen experts' matrices: in the optimized decode step of a tiny
Qwen3-MoE and a tiny Mixtral (8 experts of 40 features, top-2), the matrix products over expert weights, as
scripts/step_profile.py lists them, hold k = 2 experts' matrices for one row, and every expert's once rows x k
reaches the 8 experts (then computing all of them reads less than gathering). That the tokens do not change is the
parity of tests/test_family_qwen3_moe.py, whose decode steps take the gathered path."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
import transformers

import converters
from hdex_jax.generation import place
from hdex_jax.kv_cache import init_cache
from hdex_jax.forward import decode_step_fn
from hdex_jax.jitting import COMPILER_OPTIONS
from tests.family_parity import save_random_model

SCRIPTS = Path(__file__).parent.parent / "scripts"
HIDDEN, EXPERT_FFN, EXPERTS, TOP_K, LAYERS = 64, 40, 8, 2, 2


_SIZES = dict(vocab_size=128, hidden_size=HIDDEN, num_hidden_layers=LAYERS, max_position_embeddings=128,
              num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=TOP_K)
CONFIGS = {
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**_SIZES, intermediate_size=96, num_experts=EXPERTS,
                                                     moe_intermediate_size=EXPERT_FFN),
    "mixtral": lambda: transformers.MixtralConfig(**_SIZES, intermediate_size=EXPERT_FFN, num_local_experts=EXPERTS),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def placement(request, tmp_path_factory):
    directory = save_random_model(CONFIGS[request.param](), tmp_path_factory.mktemp(request.param))
    cfg, flat = converters.load_checkpoint(directory)
    return place(cfg, flat, 1)


def _experts_read(placement, rows: int) -> list[int]:
    """For each product of the decode step over expert weights, how many experts' matrices it reads."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        from step_profile import dot_signatures
    finally:
        sys.path.remove(str(SCRIPTS))
    step = jax.jit(lambda params, cache, token: decode_step_fn(params, cache, token, placement.cfg, placement.mesh),
                   donate_argnums=1, compiler_options=COMPILER_OPTIONS)
    inputs = (placement.params, init_cache(placement.cfg, rows, 32), jnp.zeros((rows,), jnp.int32))
    counts = []
    for signature, _ in dot_signatures(step.lower(*inputs).compile().as_text()).values():
        for dims in re.findall(r"f32\[([\d,]*)\]", signature.split("<-")[1]):
            shape = [int(d) for d in dims.split(",")]
            if len(shape) == 2 and HIDDEN in shape:  # [D, n F] or [n F, D]
                features = shape[1 - shape.index(HIDDEN)]
                if features % EXPERT_FFN == 0:
                    counts.append(features // EXPERT_FFN)
    return counts


@pytest.mark.parametrize("rows, experts", [(1, TOP_K), (4, EXPERTS)])
def test_decode_reads_the_chosen_experts(placement, rows: int, experts: int):
    # gate, up and down of every layer, each over `experts` experts' matrices.
    assert _experts_read(placement, rows) == [experts] * 3 * LAYERS
