"""Generation: one step function, two drivers.

`_start` (prefill + first token) and `_advance` (decode one token + sample) are the only step functions.
`generate_tokens` runs `_advance` inside one jitted `lax.while_loop` that stops when every row has hit a stop
token or its token budget (`_loop`; with `_start` in front of it, one program for a whole generation:
`_generate`); `stream_tokens` calls it from Python, one token at a time, for streamers and `generate_yield`.
Both produce identical tokens.

Everything that varies between calls with the same shapes is a runtime input (`Request`): the sampling
values, seeds, stop ids and token budget of each row. The compiled programs depend only on the model, the
mesh and four power-of-two buckets: batch rows, prompt length, cache length and stop-id slots. So a sweep
over sampling values, seeds, stop ids or budgets within a cache bucket compiles nothing.

With the hybrid split, `_start` runs on the prefill mesh and the state (KV cache included) is handed over to
the decode mesh by resharding, its KV heads re-laid for the decode mesh's head layout.

When the meshes span processes (`hdex_jax.distributed`), every process runs this same code: jit takes the
host inputs (numpy arrays) as global values, the same in every process, and the outputs read on the host are
replicated over the mesh, so each process reads them from its own devices.
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
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hdex_jax import pytree
from hdex_jax.config import ModelConfig
from hdex_jax.kv_cache import KVCache, init_cache
from hdex_jax.layout import HeadLayout, head_layout, kv_head_map, pad_params, padded_config
from hdex_jax.forward import decode_step_fn, prefill_fn
from hdex_jax.jitting import COMPILER_OPTIONS, JitByPromptTokens, bucket_length
from hdex_jax.params import Params, unflatten
from hdex_jax.sampling import (
    SamplingConfig,
    SamplingParams,
    apply_processors,
    mark_seen,
    next_tokens,
    row_key_data,
    seen_tokens,
)
from hdex_jax.sharding import cache_partition_specs, is_pspec, make_mesh, runtime_params
from hdex_jax.validation import per_row

# Stop-id slots per row come in buckets of at least this many, so a few more stop ids do not recompile.
_MIN_STOP_SLOTS = 4


@pytree.exportable
@pytree.dataclass
class Request:
    """The runtime inputs of one generation besides the prompts, one entry per row."""

    sampling: SamplingParams
    key_data: jax.Array  # [B, 2] uint32: each row's seed as threefry key data
    stop_ids: jax.Array  # [B, K] int32: each row's stop ids, -1 in unused slots
    budget: jax.Array  # [B] int32: new tokens each row may produce (0 for padding rows)
    pad_id: jax.Array  # [] int32


@pytree.exportable
@pytree.dataclass
class DecodeState:
    cache: KVCache
    seen: jax.Array  # [B, V] bool: ids already in each row (repetition penalty)
    token: jax.Array  # [B] int32: the last token produced
    done: jax.Array  # [B] bool: the row has produced a stop token or spent its budget
    step: jax.Array  # [] int32: tokens produced so far
    out: jax.Array  # [B, N] int32: tokens produced (pad after a row's stop token)
    # Only when a caller asks for them (`record=True`), else None: the last step's processed scores the token
    # was chosen from and its raw logits, as transformers' `output_scores` and `output_logits`. The caller keeps
    # each step's, so their memory grows with the steps generated, not with the cache.
    scores: jax.Array | None = None  # [B, V] float32
    logits: jax.Array | None = None  # [B, V] float32


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static shapes of one generation call."""

    prompt_bucket: int  # padded prompt length T
    cache_length: int  # cache slots S

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
    return Plan(bucket, cache_length)


def _record(state: DecodeState, logits: jax.Array, token: jax.Array, request: Request) -> DecodeState:
    """Append this step's token to the state (and, when recording, keep its scores and logits [B, V])."""
    if state.scores is not None:
        state = state.replace(scores=apply_processors(logits, state.seen, request.sampling),
                              logits=logits.astype(jnp.float32))
    token = jnp.where(state.done, request.pad_id, token).astype(jnp.int32)  # finished rows emit padding
    stopped = jnp.any(token[:, None] == request.stop_ids, axis=-1)  # [B]
    return state.replace(
        token=token,
        out=lax.dynamic_update_slice(state.out, token[:, None], (0, state.step)),
        done=state.done | stopped | (state.step + 1 >= request.budget),
        seen=mark_seen(state.seen, token),
        step=state.step + 1,
    )


def _start_fn(params: Params, tokens: jax.Array, mask: jax.Array, request: Request, *, cfg: ModelConfig,
           plan: Plan, mesh: Mesh, record: bool) -> DecodeState:
    """Prefill the left-padded prompts [B, T] and produce the first token; `record` keeps scores and logits."""
    B = tokens.shape[0]
    cache = init_cache(cfg, B, plan.cache_length)
    logits, cache = prefill_fn(params, cache, tokens, mask, cfg, mesh)  # [B, V]
    seen = seen_tokens(tokens, cfg.vocab_size, mask)  # [B, V]
    history = jnp.zeros((B, cfg.vocab_size), jnp.float32) if record else None
    state = DecodeState(cache=cache, seen=seen, token=jnp.zeros((B,), jnp.int32), done=request.budget < 1,
                        step=jnp.zeros((), jnp.int32), out=jnp.full((B, plan.out_length), request.pad_id, jnp.int32),
                        scores=history, logits=history)
    first = next_tokens(logits, seen, request.sampling, request.key_data, state.step)
    return _record(state, logits, first, request)


_start = JitByPromptTokens(_start_fn, static_argnames=("cfg", "plan", "mesh", "record"))


def _advance(params: Params, state: DecodeState, request: Request, *, cfg: ModelConfig, mesh: Mesh) -> DecodeState:
    """Feed the last token, sample the next one."""
    logits, cache = decode_step_fn(params, state.cache, state.token, cfg, mesh)  # [B, V]
    token = next_tokens(logits, state.seen, request.sampling, request.key_data, state.step)
    return _record(state.replace(cache=cache), logits, token, request)


_advance_jit = jax.jit(_advance, static_argnames=("cfg", "mesh"), donate_argnames="state",
                       compiler_options=COMPILER_OPTIONS)


def _loop_fn(params: Params, state: DecodeState, request: Request, *, cfg: ModelConfig, mesh: Mesh) -> DecodeState:
    """`_advance` inside one `lax.while_loop` until every row stopped or spent its budget."""
    return lax.while_loop(lambda s: ~jnp.all(s.done),
                          lambda s: _advance(params, s, request, cfg=cfg, mesh=mesh), state)


_loop = jax.jit(_loop_fn, static_argnames=("cfg", "mesh"), donate_argnames="state", compiler_options=COMPILER_OPTIONS)


def _generate_fn(params: Params, tokens: jax.Array, mask: jax.Array, request: Request, *, cfg: ModelConfig,
                 plan: Plan, mesh: Mesh) -> DecodeState:
    """`_start` and `_loop` as one program: a whole generation on one mesh in one dispatch (and, for a compiled
    model, one executable to load instead of two)."""
    state = _start_fn(params, tokens, mask, request, cfg=cfg, plan=plan, mesh=mesh, record=False)
    return _loop_fn(params, state, request, cfg=cfg, mesh=mesh)


_generate = JitByPromptTokens(_generate_fn, static_argnames=("cfg", "plan", "mesh"))

# The programs a generation runs, under the names a compiled model exports them by (`Placement.program`): a whole
# generation, prefill and the first token, one decode step. "start" and "generate" are jitted per prompt bucket
# (`[prompt_bucket]` is the program).
PROGRAMS = {"start": _start, "generate": _generate, "advance": _advance_jit}


@dataclasses.dataclass(frozen=True)
class Placement:
    """Weights laid out for one mesh: `cfg` is the padded config of that layout, `source_cfg` the checkpoint's."""

    params: Params
    cfg: ModelConfig
    layout: HeadLayout
    mesh: Mesh
    source_cfg: ModelConfig
    # The compiled programs of this mesh (`hdex_jax.exported_programs.Programs`), used for the shapes they cover.
    programs: Any = None

    def program(self, name: str, batch: Batch, record: bool = False) -> Any:
        """The exported program `name` ("start", "generate", "advance") for `batch`, or None: trace it."""
        return None if self.programs is None or record else self.programs.get(name, batch)


def place(cfg: ModelConfig, flat: dict[str, np.ndarray], num_device: int, first_device: int = 0) -> Placement:
    """Canonical flat weights of `cfg` (e.g. from `converters.load_checkpoint`), laid out for `num_device`
    devices and placed on the mesh of devices [first_device, first_device + num_device), without compiling."""
    mesh = make_mesh(num_device, first_device)
    padded = padded_config(cfg, num_device)
    params = runtime_params(unflatten(pad_params(flat, cfg, num_device)), padded, mesh)
    return Placement(params, padded, head_layout(cfg, num_device), mesh, cfg)


@functools.partial(jax.jit, static_argnames="index")
def _regroup_kv_heads(layers: tuple[jax.Array, ...], index: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """L x [B, KV_src, S, hd] -> L x [B, KV_dst, S, hd]: KV head j of the result is source head index[j], or
    zeros."""
    idx = np.asarray(index)
    return tuple(jnp.where((idx >= 0)[None, :, None, None], jnp.take(x, np.maximum(idx, 0), axis=1), 0)
                 for x in layers)


def _hand_over(state: DecodeState, src: Placement, dst: Placement) -> DecodeState:
    """Move a decode state from the prefill mesh to the decode mesh, re-laying the KV heads for its layout."""
    if src.mesh == dst.mesh:
        return state
    index = tuple(int(i) for i in kv_head_map(src.layout, dst.layout))
    cache = state.cache.replace(k=_regroup_kv_heads(state.cache.k, index), v=_regroup_kv_heads(state.cache.v, index))
    shardings = jax.tree.map(lambda spec: NamedSharding(dst.mesh, spec), cache_partition_specs(dst.cfg),
                             is_leaf=is_pspec)
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
    """Left-padded prompts (rows padded to a power of two) and the request that goes with them."""

    tokens: np.ndarray  # [B, T] int32
    mask: np.ndarray  # [B, T] int32
    request: Request
    rows: int  # the caller's rows; rows beyond are padding
    plan: Plan

    @property
    def stop_ids(self) -> np.ndarray:
        """[rows, K] stop ids of the caller's rows (-1 in unused slots)."""
        return np.asarray(self.request.stop_ids)[: self.rows]


def _fresh_seeds(count: int) -> list[int]:
    """`count` random 64-bit seeds; in a cluster, process 0's draw is everyone's so all feed the same keys."""
    data = np.array([[secrets.randbits(32), secrets.randbits(32)] for _ in range(count)], np.uint32)
    if jax.process_count() > 1:
        data = np.asarray(multihost_utils.broadcast_one_to_all(data))
    return [(int(hi) << 32) | int(lo) for hi, lo in data]


def prepare_batch(prompts: Sequence[Sequence[int]], *, max_length: int,
                  max_new_tokens: int | Sequence[int], stop: Sequence[int] | Sequence[Sequence[int]], pad_id: int,
                  seed: int | None | Sequence[int | None],
                  sampling: SamplingConfig | Sequence[SamplingConfig] = SamplingConfig(),
                  sequence: int | Sequence[int] = 0) -> Batch:
    """Left-pad checked prompts (non-empty lists of ids in the vocabulary) into their bucket; per-row values
    become the runtime `Request`.

    `max_new_tokens`, `seed` and `sampling` take one value or one per prompt; `stop` is a list of ids for every
    row or a list of such lists, one per prompt. A seed of None draws a fresh 64-bit seed. `sequence` numbers
    the rows that share a prompt and a seed (`num_return_sequences`): each draws from its own key.
    """
    if len(prompts) == 0:
        raise ValueError("inputs is empty: give at least one prompt")
    rows = len(prompts)
    budgets = per_row("max_new_tokens", max_new_tokens, rows)
    stops = per_row("stop", stop, rows) if stop and isinstance(stop[0], (list, tuple)) else [list(stop)] * rows
    seeds = per_row("seed", seed, rows)
    fresh = iter(_fresh_seeds(sum(s is None for s in seeds)))
    seeds = [next(fresh) if s is None else s for s in seeds]
    configs = per_row("sampling", sampling, rows)

    plan = plan_generation(max(len(p) for p in prompts), max(budgets), max_length)
    B, T = bucket_length(rows, minimum=1), plan.prompt_bucket
    tokens = np.full((B, T), pad_id, np.int32)
    mask = np.zeros((B, T), np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, T - len(prompt):] = prompt
        mask[i, T - len(prompt):] = 1
    padding = B - rows  # padding rows: no prompt, no budget, greedy, so they cost no sampling work
    stop_ids = np.full((B, bucket_length(max(map(len, stops)), _MIN_STOP_SLOTS)), -1, np.int32)
    for i, ids in enumerate(stops):
        stop_ids[i, : len(ids)] = ids
    request = Request(
        sampling=SamplingParams.from_configs(configs + [SamplingConfig()] * padding),
        key_data=np.stack([row_key_data(s, j) for s, j in zip(seeds + [0] * padding,
                                                               per_row("sequence", sequence, rows) + [0] * padding)]),
        stop_ids=stop_ids,
        budget=np.asarray(budgets + [0] * padding, np.int32),
        pad_id=np.int32(pad_id),
    )
    return Batch(tokens, mask, request, rows, plan)


def _started(decode: Placement, batch: Batch, prefill: Placement | None, record: bool = False) -> DecodeState:
    """Prefill (on the prefill placement if given) and the first token, handed over to the decode placement."""
    src = prefill if prefill is not None else decode
    exported = src.program("start", batch, record)
    if exported is not None:
        state = exported(src.params, batch.tokens, batch.mask, batch.request)
    else:
        start = _start[batch.plan.prompt_bucket]
        state = start(src.params, batch.tokens, batch.mask, batch.request, cfg=src.cfg, plan=batch.plan,
                      mesh=src.mesh, record=record)
    return _hand_over(state, src, decode)


@dataclasses.dataclass(frozen=True)
class Recorded:
    """New tokens of each row, with the scores and logits of every step (`generate_recorded`)."""

    tokens: list[list[int]]
    scores: np.ndarray  # [rows, steps, V] float32: processed scores each token was chosen from
    logits: np.ndarray  # [rows, steps, V] float32: raw logits


def _finished(decode: Placement, batch: Batch, prefill: Placement | None) -> DecodeState:
    """The state after the whole generation: one program on one mesh; prefill, hand-over and decode loop for
    the hybrid split (which always traces)."""
    if prefill is None:
        exported = decode.program("generate", batch)
        if exported is not None:
            return exported(decode.params, batch.tokens, batch.mask, batch.request)
        whole = _generate[batch.plan.prompt_bucket]
        return whole(decode.params, batch.tokens, batch.mask, batch.request, cfg=decode.cfg, plan=batch.plan,
                     mesh=decode.mesh)
    state = _started(decode, batch, prefill)
    return _loop(decode.params, state, batch.request, cfg=decode.cfg, mesh=decode.mesh)


def generate_tokens(decode: Placement, batch: Batch, prefill: Placement | None = None) -> list[list[int]]:
    """Whole decode in one jitted while loop: the new tokens of each row, up to and including its stop token.

    Prefill runs on `prefill` when given (the hybrid split), else on `decode`.
    """
    return _new_tokens(_finished(decode, batch, prefill), batch)


def generate_recorded(decode: Placement, batch: Batch, prefill: Placement | None = None) -> Recorded:
    """`generate_tokens`, also keeping each step's processed scores and raw logits (for every row, until the
    last row stops, as transformers' `output_scores`/`output_logits`).

    Driven step by step (the same tokens as the whole loop), each step's [rows, V] copied to the host as it
    comes: memory in proportion to the steps generated, where a history inside the loop would hold the whole
    cache bucket's steps."""
    state = _started(decode, batch, prefill, record=True)
    scores, logits = [], []
    while True:
        scores.append(np.asarray(state.scores)[: batch.rows])
        logits.append(np.asarray(state.logits)[: batch.rows])
        if bool(np.all(state.done)):
            break
        state = _advance_jit(decode.params, state, batch.request, cfg=decode.cfg, mesh=decode.mesh)
    return Recorded(_new_tokens(state, batch), np.stack(scores, axis=1), np.stack(logits, axis=1))


def _new_tokens(state: DecodeState, batch: Batch) -> list[list[int]]:
    """The caller's rows of a finished state, each cut after its stop token and at its budget."""
    out = np.asarray(state.out)[: batch.rows, : int(state.step)]
    return _trim(out, batch.stop_ids, np.asarray(batch.request.budget)[: batch.rows])


def stream_tokens(decode: Placement, batch: Batch, prefill: Placement | None = None) -> Iterator[np.ndarray]:
    """Step driver: yields the [rows] tokens of each step (pad for rows already stopped) as they are produced."""
    state = _started(decode, batch, prefill)
    yield np.asarray(state.token)[: batch.rows]
    exported = decode.program("advance", batch)
    advance = exported if exported is not None else functools.partial(_advance_jit, cfg=decode.cfg, mesh=decode.mesh)
    while not bool(np.all(state.done)):
        state = advance(decode.params, state, batch.request)
        yield np.asarray(state.token)[: batch.rows]


def _trim(out: np.ndarray, stop_ids: np.ndarray, budgets: np.ndarray) -> list[list[int]]:
    """Cut each row after its first stop token and at its budget."""
    rows = []
    for row, stops, budget in zip(out.tolist(), stop_ids.tolist(), budgets.tolist()):
        row = row[:budget]
        for j, token in enumerate(row):
            if token in stops:
                row = row[: j + 1]
                break
        rows.append(row)
    return rows
