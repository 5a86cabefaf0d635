"""Padding for N devices on configs no checkpoint family has (prime vocabulary, odd FFN, GELU, learned
positions): the padded weights match the padded declaration, and results do not depend on N."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hdex_jax.config import ModelConfig
from hdex_jax.generation import place
from hdex_jax.kv_cache import init_cache
from hdex_jax.layout import head_layout, kv_head_map, pad_params, padded_config
from hdex_jax.jitting import prefill
from hdex_jax.params import check_params, flatten, init_params, unflatten

ROPE_GQA = ModelConfig(model_type="llama", vocab_size=101, hidden_size=48, num_layers=2, num_heads=6,
                       num_kv_heads=3, head_dim=8, intermediate_size=40, max_position_embeddings=64, embed_dim=48)
LEARNED_GELU = dataclasses.replace(ROPE_GQA, model_type="opt", num_kv_heads=6, norm="layernorm", positions="learned",
                                   position_offset=2, activation="gelu", gated_mlp=False, qkv_bias=True, o_bias=True,
                                   mlp_bias=True, tie_embeddings=True)


@pytest.mark.parametrize("cfg", [ROPE_GQA, LEARNED_GELU], ids=["rope-gqa", "learned-gelu"])
def test_padding_matches_declaration_and_never_changes_logits(cfg):
    flat = {k: np.asarray(v) for k, v in flatten(init_params(cfg, jax.random.key(0), scale=0.2)).items()}
    tokens = jnp.asarray([[0, 0, 5, 100, 7, 3], [1, 2, 3, 4, 5, 6]], jnp.int32)
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1], [1] * 6], jnp.int32)

    def logits(n):
        placed = place(cfg, flat, n)
        out, _ = prefill(placed.params, init_cache(placed.cfg, 2, 16), tokens, mask, placed.cfg, placed.mesh)
        return np.asarray(out)

    reference = logits(1)
    for n in (2, 3, 4, 5, 7, 8):
        check_params(unflatten(pad_params(flat, cfg, n)), padded_config(cfg, n), source=f"padded for {n}")
        np.testing.assert_allclose(logits(n), reference, atol=1e-5, rtol=0, err_msg=f"N={n}")


@pytest.mark.parametrize("src, dst", [(1, 8), (8, 1), (2, 4), (3, 8), (5, 2)])
def test_kv_head_map_points_at_the_same_model_head(src, dst):
    cfg = ROPE_GQA
    a, b = head_layout(cfg, src), head_layout(cfg, dst)
    index = kv_head_map(a, b)
    assert len(index) == b.stored_kv_heads
    # Padding heads (beyond the model's 3) map to -1; real heads map to a stored head holding the same one.
    for stored, source in enumerate(index):
        real = stored // b.replicas
        if real >= cfg.num_kv_heads:
            assert source == -1
        else:
            assert source // a.replicas == real
