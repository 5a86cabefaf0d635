"""Generation: one step function, two drivers.

`_start` (prefill + first token) and `_advance` (decode one token + sample) are the only step functions.
`generate_tokens` runs `_advance` inside one jitted `lax.while_loop` that stops when every row has hit a stop
token or the token budget; `stream_tokens` calls it from Python, one token at a time, for streamers and
`generate_yield`. Both produce identical tokens.

With the hybrid split, `_start` runs on the prefill mesh and the state (KV cache included) is handed over to
the decode mesh by resharding, its KV heads re-laid for the decode mesh's head layout.

A batch is left-padded to a power-of-two bucket so new prompt lengths reuse compiled programs; the cache
holds `bucket + new tokens` slots, also rounded up to a power of two (capped at the compiled max_length).

When the meshes span processes (`hdex_jax.distributed`), every process runs this same code: jit takes the
host inputs (numpy arrays, the seed key) as global values, the same in every process, and the outputs read
on the host are replicated over the mesh, so each process reads them from its own devices.
"""

from __future__ import annotations

import dataclasses
import functools
import secrets
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hdex_jax.config import ModelConfig
from hdex_jax.kv_cache import KVCache, init_cache
from hdex_jax.layout import HeadLayout, head_layout, kv_head_map, pad_params, padded_config
from hdex_jax.model import bucket_length, decode_step_fn, prefill_fn
from hdex_jax.params import Params, unflatten
from hdex_jax.sampling import SamplingConfig, mark_seen, next_tokens, seen_tokens
from hdex_jax.sharding import cache_partition_specs, device_put_params, is_pspec, make_mesh


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


_start_jit = jax.jit(_start, static_argnames=("cfg", "sampling", "plan", "mesh"))
_advance_jit = jax.jit(_advance, static_argnames=("cfg", "sampling", "mesh"), donate_argnames="state")


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "max_new_tokens", "mesh"), donate_argnames="state")
def _loop(params: Params, state: DecodeState, seed_key: jax.Array, rows: jax.Array, stop_ids: jax.Array,
          pad_id: jax.Array, *, cfg: ModelConfig, sampling: SamplingConfig, max_new_tokens: int,
          mesh: Mesh) -> DecodeState:
    """`_advance` inside one `lax.while_loop` until every row stopped or the budget is spent."""

    def running(s: DecodeState) -> jax.Array:
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def body(s: DecodeState) -> DecodeState:
        return _advance(params, s, seed_key, rows, stop_ids, pad_id, cfg=cfg, sampling=sampling, mesh=mesh)

    return lax.while_loop(running, body, state)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Weights laid out for one mesh: `cfg` is the padded config of that layout."""

    params: Params
    cfg: ModelConfig
    layout: HeadLayout
    mesh: Mesh


def place(cfg: ModelConfig, flat: dict[str, np.ndarray], num_device: int, first_device: int = 0) -> Placement:
    """Canonical flat weights of `cfg` (e.g. from `converters.load_checkpoint`), laid out for `num_device`
    devices and placed on the mesh of devices [first_device, first_device + num_device), without compiling."""
    mesh = make_mesh(num_device, first_device)
    padded = padded_config(cfg, num_device)
    params = device_put_params(unflatten(pad_params(flat, cfg, num_device)), padded, mesh)
    return Placement(params, padded, head_layout(cfg, num_device), mesh)


@functools.partial(jax.jit, static_argnames="index")
def _regroup_kv_heads(x: jax.Array, index: tuple[int, ...]) -> jax.Array:
    """[L, B, KV_src, S, hd] -> [L, B, KV_dst, S, hd]: KV head j of the result is source head index[j], or zeros."""
    idx = np.asarray(index)
    picked = jnp.take(x, np.maximum(idx, 0), axis=2)
    return jnp.where((idx >= 0)[None, None, :, None, None], picked, 0)


def _hand_over(state: DecodeState, src: Placement, dst: Placement) -> DecodeState:
    """Move a decode state from the prefill mesh to the decode mesh, re-laying the KV heads for its layout."""
    if src.mesh == dst.mesh:
        return state
    index = tuple(int(i) for i in kv_head_map(src.layout, dst.layout))
    cache = state.cache.replace(k=_regroup_kv_heads(state.cache.k, index), v=_regroup_kv_heads(state.cache.v, index))
    shardings = jax.tree.map(lambda spec: NamedSharding(dst.mesh, spec), cache_partition_specs(), is_leaf=is_pspec)
    moved = _move(state.replace(cache=None), NamedSharding(dst.mesh, PartitionSpec()))
    return moved.replace(cache=_move(cache, shardings))


def _move(tree: Any, shardings: Any) -> Any:
    """`jax.device_put` of a pytree onto another mesh, also when the meshes span processes.

    JAX on CPU cannot reshard between different device sets across processes, so there the arrays go through
    the host: gathered into every process, then placed from that (now identical) host value.
    """
    if all(x.is_fully_addressable for x in jax.tree.leaves(tree)):
        return jax.device_put(tree, shardings)
    return jax.device_put(multihost_utils.process_allgather(tree, tiled=True), shardings)


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
        if jax.process_count() > 1:
            # Every process of a cluster must feed the same key: process 0's draw is everyone's.
            seed = int(multihost_utils.broadcast_one_to_all(np.int32(seed)))
    return Batch(tokens, mask, jax.random.key(seed), np.arange(B, dtype=np.int32),
                 np.asarray(list(stop), np.int32), np.int32(pad_id), plan)


def _started(decode: Placement, batch: Batch, sampling: SamplingConfig,
             prefill: Placement | None) -> DecodeState:
    """Prefill (on the prefill placement if given) and the first token, handed over to the decode placement."""
    src = prefill if prefill is not None else decode
    state = _start_jit(src.params, batch.tokens, batch.mask, batch.seed_key, batch.rows, batch.stop_ids,
                       batch.pad_id, cfg=src.cfg, sampling=sampling, plan=batch.plan, mesh=src.mesh)
    return _hand_over(state, src, decode)


def generate_tokens(decode: Placement, batch: Batch, sampling: SamplingConfig,
                    prefill: Placement | None = None) -> list[list[int]]:
    """Whole decode in one jitted while loop: the new tokens of each row, up to and including its stop token.

    Prefill runs on `prefill` when given (the hybrid split), else on `decode`.
    """
    args = (batch.seed_key, batch.rows, batch.stop_ids, batch.pad_id)
    state = _started(decode, batch, sampling, prefill)
    state = _loop(decode.params, state, *args, cfg=decode.cfg, sampling=sampling,
                  max_new_tokens=batch.plan.max_new_tokens, mesh=decode.mesh)
    return _trim(np.asarray(state.out)[:, : int(state.step)], batch.stop_ids)


def stream_tokens(decode: Placement, batch: Batch, sampling: SamplingConfig,
                  prefill: Placement | None = None) -> Iterator[np.ndarray]:
    """Step driver: yields the [B] tokens of each step (pad for rows already stopped) as they are produced."""
    args = (batch.seed_key, batch.rows, batch.stop_ids, batch.pad_id)
    state = _started(decode, batch, sampling, prefill)
    yield np.asarray(state.token)
    for _ in range(batch.plan.max_new_tokens - 1):
        if bool(jnp.all(state.done)):
            return
        state = _advance_jit(decode.params, state, *args, cfg=decode.cfg, sampling=sampling, mesh=decode.mesh)
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
