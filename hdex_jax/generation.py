"""Generation: one step function, two drivers.

`_start` (prefill + first token) and `_advance` (decode one token + sample) are the only step functions.
`generate_tokens` runs them inside one jit with a `lax.while_loop` that stops when every row has hit a stop
token or the token budget; `stream_tokens` calls the same two functions from Python, one token at a time,
for streamers and `generate_yield`. Both produce identical tokens.

A batch is left-padded to a power-of-two bucket so new prompt lengths reuse compiled programs; the cache
holds `bucket + new tokens` slots, also rounded up to a power of two (capped at the compiled max_length).
"""

from __future__ import annotations

import dataclasses
import functools
import secrets
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax
from jax.sharding import Mesh

from hdex_jax.config import ModelConfig
from hdex_jax.kv_cache import KVCache, init_cache
from hdex_jax.model import bucket_length, decode_step_fn, prefill_fn
from hdex_jax.params import Params
from hdex_jax.sampling import SamplingConfig, mark_seen, next_tokens, seen_tokens
from hdex_jax.sharding import make_mesh


@struct.dataclass
class DecodeState:
    cache: KVCache
    seen: jax.Array  # [B, V] bool: ids already in each row (repetition penalty)
    token: jax.Array  # [B] int32: the last token produced
    done: jax.Array  # [B] bool: the row has produced a stop token
    step: jax.Array  # [] int32: tokens produced so far
    out: jax.Array  # [B, N] int32: tokens produced (pad after a row's stop token)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static shapes of one generation call."""

    prompt_bucket: int  # padded prompt length T
    cache_length: int  # cache slots S
    max_new_tokens: int

    @property
    def out_length(self) -> int:
        return self.cache_length - self.prompt_bucket


def plan_generation(prompt_length: int, max_new_tokens: int, max_length: int) -> Plan:
    """Choose the prompt bucket and cache size; raise if the prompt and new tokens cannot fit max_length."""
    if prompt_length > max_length:
        raise ValueError(f"the prompt has {prompt_length} tokens, more than the model's max_length "
                         f"({max_length}); compile with a larger max_length or shorten the prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if prompt_length + max_new_tokens > max_length:
        raise ValueError(f"the prompt ({prompt_length} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's max_length ({max_length}); lower max_new_tokens or compile with a larger "
                         "max_length")
    bucket = min(bucket_length(prompt_length), max_length - max_new_tokens)
    cache_length = min(max_length, bucket_length(bucket + max_new_tokens))
    return Plan(bucket, cache_length, max_new_tokens)


def _record(state: DecodeState, token: jax.Array, stop_ids: jax.Array, pad_id: jax.Array) -> DecodeState:
    token = jnp.where(state.done, pad_id, token).astype(jnp.int32)  # finished rows emit padding
    return state.replace(
        token=token,
        out=lax.dynamic_update_slice(state.out, token[:, None], (0, state.step)),
        done=state.done | jnp.isin(token, stop_ids),
        seen=mark_seen(state.seen, token),
        step=state.step + 1,
    )


def _start(params: Params, tokens: jax.Array, mask: jax.Array, seed_key: jax.Array, rows: jax.Array,
           stop_ids: jax.Array, pad_id: jax.Array, *, cfg: ModelConfig, sampling: SamplingConfig,
           plan: Plan, mesh: Mesh) -> DecodeState:
    """Prefill the left-padded prompts [B, T] and produce the first token."""
    B = tokens.shape[0]
    cache = init_cache(cfg, B, plan.cache_length)
    logits, cache = prefill_fn(params, cache, tokens, mask, cfg, mesh)  # [B, V]
    seen = seen_tokens(tokens, cfg.vocab_size, mask)  # [B, V]
    state = DecodeState(cache=cache, seen=seen, token=jnp.zeros((B,), jnp.int32), done=jnp.zeros((B,), bool),
                        step=jnp.zeros((), jnp.int32), out=jnp.full((B, plan.out_length), pad_id, jnp.int32))
    first = next_tokens(logits, seen, sampling, seed_key, rows, state.step)
    return _record(state, first, stop_ids, pad_id)


def _advance(params: Params, state: DecodeState, seed_key: jax.Array, rows: jax.Array, stop_ids: jax.Array,
             pad_id: jax.Array, *, cfg: ModelConfig, sampling: SamplingConfig, mesh: Mesh) -> DecodeState:
    """Feed the last token, sample the next one."""
    logits, cache = decode_step_fn(params, state.cache, state.token, cfg, mesh)  # [B, V]
    token = next_tokens(logits, state.seen, sampling, seed_key, rows, state.step)
    return _record(state.replace(cache=cache), token, stop_ids, pad_id)


_STATIC = ("cfg", "sampling", "plan", "mesh")
_start_jit = jax.jit(_start, static_argnames=_STATIC)
_advance_jit = jax.jit(_advance, static_argnames=("cfg", "sampling", "mesh"), donate_argnames="state")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate_loop(params: Params, tokens: jax.Array, mask: jax.Array, seed_key: jax.Array, rows: jax.Array,
                   stop_ids: jax.Array, pad_id: jax.Array, *, cfg: ModelConfig, sampling: SamplingConfig,
                   plan: Plan, mesh: Mesh) -> tuple[jax.Array, jax.Array]:
    state = _start(params, tokens, mask, seed_key, rows, stop_ids, pad_id, cfg=cfg, sampling=sampling, plan=plan,
                   mesh=mesh)

    def running(s: DecodeState) -> jax.Array:
        return (s.step < plan.max_new_tokens) & ~jnp.all(s.done)

    def body(s: DecodeState) -> DecodeState:
        return _advance(params, s, seed_key, rows, stop_ids, pad_id, cfg=cfg, sampling=sampling, mesh=mesh)

    state = lax.while_loop(running, body, state)
    return state.out, state.step


@dataclasses.dataclass(frozen=True)
class Batch:
    """Left-padded prompts and everything a driver needs besides params."""

    tokens: np.ndarray  # [B, T] int32
    mask: np.ndarray  # [B, T] int32
    seed_key: jax.Array
    rows: np.ndarray  # [B] int32
    stop_ids: np.ndarray  # [K] int32
    pad_id: np.int32
    plan: Plan


def prepare_batch(prompts: Sequence[Sequence[int]], cfg: ModelConfig, *, max_length: int,
                  max_new_tokens: int, stop: Sequence[int], pad_id: int, seed: int | None) -> Batch:
    """Validate prompts and left-pad them into their bucket."""
    if len(prompts) == 0:
        raise ValueError("inputs is empty: give at least one prompt")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        bad = [t for t in prompt if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {cfg.vocab_size}): {bad[:5]}")
    plan = plan_generation(max(len(p) for p in prompts), max_new_tokens, max_length)
    B, T = len(prompts), plan.prompt_bucket
    tokens = np.full((B, T), pad_id, np.int32)
    mask = np.zeros((B, T), np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, T - len(prompt):] = prompt
        mask[i, T - len(prompt):] = 1
    if seed is None:
        seed = secrets.randbits(31)
    return Batch(tokens, mask, jax.random.key(seed), np.arange(B, dtype=np.int32),
                 np.asarray(list(stop), np.int32), np.int32(pad_id), plan)


def generate_tokens(params: Params, cfg: ModelConfig, batch: Batch, sampling: SamplingConfig,
                    mesh: Mesh | None = None) -> list[list[int]]:
    """Whole generation in one jit: the new tokens of each row, up to and including its stop token.

    `params` are laid out for `mesh` (`layout.padded_config(cfg, N)`); mesh None is one device.
    """
    mesh = mesh if mesh is not None else make_mesh(1)
    out, steps = _generate_loop(params, batch.tokens, batch.mask, batch.seed_key, batch.rows, batch.stop_ids,
                                batch.pad_id, cfg=cfg, sampling=sampling, plan=batch.plan, mesh=mesh)
    return _trim(np.asarray(out)[:, : int(steps)], batch.stop_ids)


def stream_tokens(params: Params, cfg: ModelConfig, batch: Batch, sampling: SamplingConfig,
                  mesh: Mesh | None = None) -> Iterator[np.ndarray]:
    """Step driver: yields the [B] tokens of each step (pad for rows already stopped) as they are produced."""
    mesh = mesh if mesh is not None else make_mesh(1)
    args = (batch.seed_key, batch.rows, batch.stop_ids, batch.pad_id)
    state = _start_jit(params, batch.tokens, batch.mask, *args, cfg=cfg, sampling=sampling, plan=batch.plan,
                       mesh=mesh)
    yield np.asarray(state.token)
    for _ in range(batch.plan.max_new_tokens - 1):
        if bool(jnp.all(state.done)):
            return
        state = _advance_jit(params, state, *args, cfg=cfg, sampling=sampling, mesh=mesh)
        yield np.asarray(state.token)


def _trim(out: np.ndarray, stop_ids: np.ndarray) -> list[list[int]]:
    """Cut each row after its first stop token."""
    rows = []
    for row in out.tolist():
        for j, token in enumerate(row):
            if token in stop_ids:
                row = row[: j + 1]
                break
        rows.append(row)
    return rows
