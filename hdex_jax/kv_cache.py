"""The fixed-shape KV cache: keys and values of every layer, plus which slots hold real tokens.

Slots are columns of the (left-padded) batch: the prompt fills slots [0, T), generated tokens follow one
slot per step, so every row writes the same slot at a step and one `dynamic_update_slice` serves the batch.
Each layer has its own k and v arrays, read and updated in place by the unrolled layer loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hdex_jax import pytree
from hdex_jax.config import ModelConfig


@pytree.exportable
@pytree.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # L x [B, KV, S, hd]
    v: tuple[jax.Array, ...]  # L x [B, KV, S, hd]
    valid: jax.Array  # [B, S] bool: the slot holds a real (not padding) token
    next_slot: jax.Array  # [] int32: slot the next token is written to
    next_pos: jax.Array  # [B] int32: position id of each row's next token

    @property
    def max_length(self) -> int:
        return self.k[0].shape[2]


def init_cache(cfg: ModelConfig, batch: int, max_length: int) -> KVCache:
    """An empty cache for `batch` rows of up to `max_length` tokens each."""
    shape = (batch, cfg.num_kv_heads, max_length, cfg.head_dim)
    return KVCache(
        k=tuple(jnp.zeros(shape, cfg.dtype) for _ in range(cfg.num_layers)),
        v=tuple(jnp.zeros(shape, cfg.dtype) for _ in range(cfg.num_layers)),
        valid=jnp.zeros((batch, max_length), bool),
        next_slot=jnp.zeros((), jnp.int32),
        next_pos=jnp.zeros((batch,), jnp.int32),
    )
