"""Next-token selection with Hugging Face `generate` semantics, per-row runtime values and explicit PRNG keys.

Processing order, as in transformers' `generate` (processors first, then the sampling warpers):

1. repetition penalty over every distinct id already in the row (prompt and output, left padding
   excluded): positive scores are divided by the penalty, negative ones multiplied;
2. only when sampling: temperature (scores / temperature);
3. top-k: keep every score >= the k-th largest, so ties with the k-th value survive;
4. top-p: HF's formula (ascending sort, softmax, cumulative sum, remove where cumprob <= 1 - top_p,
   always keep the `min_tokens_to_keep` most likely);
5. greedy = argmax, sampling = `jax.random.categorical` of the processed scores.

Removed entries are -inf. Logits are float32 before any processor.

Every sampling value is a runtime array with one entry per row (`SamplingParams`): a new temperature, top-p,
top-k, penalty or do_sample compiles nothing, and each row of a batch is processed with its own values.

Decode must not sort the vocabulary. Top-k and top-p are decided on the 256 largest scores (`lax.top_k`, cheap)
whenever that is exact: every token that can survive is a candidate and no other token ties with one. Otherwise
the 2048 largest are tried, and only then (k above 2048, a tie across the boundary, a nucleus wider than that) is
the whole vocabulary sorted, as HF does. Both paths keep the same tokens, and the draw adds
Gumbel noise over the whole vocabulary, so a row's token does not depend on the path its batch took.

Randomness is explicit and belongs to the row. A seed s in [0, 2**64) is the threefry key with data
[s >> 32, s & 0xFFFFFFFF] (`seed_key_data`; for s < 2**32 that is exactly `jax.random.key(s)`), and the key of
a row at decode step t is `fold_in(key(seed), t)`; sequence j > 0 of `num_return_sequences` uses
`fold_in(key(seed), j)` in place of key(seed) (`row_key_data`). A token therefore depends only on its row's logits,
seed, sequence, step and values: never on the row's position in the batch, the other rows, the device count or
streaming.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hdex_jax import pytree
from hdex_jax.validation import (
    check_bool,
    check_float,
    check_int,
    check_repetition_penalty,
    check_seed,
    check_temperature,
    check_top_k,
    check_top_p,
    per_row,
)

# How many top scores decide top-k and top-p before a full sort of the vocabulary, tried in turn (see the module
# docstring). On SmolLM2 with top_p 0.9, 256 candidates suffice for about 2/3 of the steps and 2048 for nearly all.
CANDIDATES = (256, 2048)
# The candidates decide top-p alone only when the mass outside them is clearly below 1 - top_p; this margin
# keeps float32 summation noise (the full path sums in another order) from deciding a boundary token.
_TAIL_MARGIN = 1e-5


@dataclasses.dataclass(frozen=True)
class Setting:
    """One sampling value, declared once for every entry point that takes it: `generate` and `generate_yield`
    (keyword arguments), the flags of `hdex generate`, `SamplingConfig`, `process_logits` and `sample`.

    Attributes:
        name: the keyword argument; the flag is `--` and the name with dashes.
        default: HyperDex's default, that of `generate` and of `hdex generate` (where a bool is a switch, off
            unless given).
        off: the value that leaves the scores as they are, transformers' default and `SamplingConfig`'s.
        check: the `hdex_jax.validation` check, given the name to report and the value.
        help: the flag's help; `{name}` stands for a setting's default.
        when_sampling: checked only when sampling: greedy decoding ignores the value (any number), as
            transformers does.
    """

    name: str
    default: Any
    off: Any
    check: Callable[[str, Any], Any]
    help: str
    when_sampling: bool = False

    @property
    def flag(self) -> str:
        """The `hdex generate` flag."""
        return "--" + self.name.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("do_sample", True, False, check_bool,
            "sample instead of greedy decoding; with HyperDex's default --top-k {top_k} sampling still picks the top "
            "token: raise --top-k (or 0, off) to sample"),
    Setting("top_p", 0.7, 1.0, check_top_p, "nucleus sampling mass, 1.0 = off (default: {top_p})"),
    Setting("top_k", 1, 0, check_top_k, "keep the k most likely tokens, 0 = off (default: {top_k}, HyperDex's)"),
    Setting("temperature", 1.0, 1.0, check_temperature, "sampling temperature (default: {temperature})",
            when_sampling=True),
    Setting("repetition_penalty", 1.2, 1.0, check_repetition_penalty,
            "penalty of tokens already present, 1.0 = off (default: {repetition_penalty})"),
)
# HyperDex's defaults, and the values that switch each processor off, by name.
DEFAULTS: dict[str, Any] = {setting.name: setting.default for setting in SETTINGS}
OFF: dict[str, Any] = {setting.name: setting.off for setting in SETTINGS}


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """One row's sampling values, checked by `hdex_jax.validation`; `SamplingParams` stacks them into runtime arrays.

    Accepted as in transformers' processors, with a TypeError or ValueError naming the argument: integers where
    a float is wanted, `top_k=0` and `top_p=1` for "off", and any temperature when `do_sample` is False.
    """

    do_sample: bool = OFF["do_sample"]
    repetition_penalty: float = OFF["repetition_penalty"]
    temperature: float = OFF["temperature"]
    top_k: int = OFF["top_k"]
    top_p: float = OFF["top_p"]
    min_tokens_to_keep: int = 1

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: store the checked, normalised (plain Python) values
        for setting in SETTINGS:  # do_sample first: the others' checks depend on it
            check = setting.check if self.do_sample or not setting.when_sampling else check_float
            set_(self, setting.name, check(setting.name, getattr(self, setting.name)))
        set_(self, "min_tokens_to_keep", check_int("min_tokens_to_keep", self.min_tokens_to_keep, minimum=1))


def _ids_in_vocab(ids: jax.Array, vocab_size: int, keep: jax.Array | bool = True) -> jax.Array:
    """Map ids to ignore (masked, negative, >= vocab) to `vocab_size`, which a `mode="drop"` scatter skips.

    Out-of-vocab ids are ignored as in HF (its embedding may be larger than the lm_head); negative ids
    must be remapped explicitly because JAX indexing would otherwise wrap them around.
    """
    valid = (ids >= 0) & (ids < vocab_size) & keep
    return jnp.where(valid, ids, vocab_size)


def seen_tokens(input_ids: jax.Array, vocab_size: int, attention_mask: jax.Array | None = None) -> jax.Array:
    """[B, S] ids (+ optional [B, S] 0/1 mask; 0 = left padding, ignored) -> [B, V] bool: ids each row contains.

    Ids outside [0, V) are ignored: HF drops ids >= V (an embedding larger than the lm_head), and negative
    ids are no tokens.
    """
    input_ids = jnp.asarray(input_ids)
    batch = input_ids.shape[0]
    keep = True if attention_mask is None else jnp.asarray(attention_mask) != 0  # [B, S]
    ids = _ids_in_vocab(input_ids, vocab_size, keep)  # [B, S]
    rows = jnp.arange(batch)[:, None]  # [B, 1]
    # A scatter rather than one_hot(...).any(1): one_hot would materialise [B, S, V].
    return jnp.zeros((batch, vocab_size), bool).at[rows, ids].set(True, mode="drop")


def mark_seen(seen: jax.Array, tokens: jax.Array) -> jax.Array:
    """[B, V] bool, [B] int -> [B, V] with the new tokens marked."""
    batch, vocab_size = seen.shape
    ids = _ids_in_vocab(jnp.asarray(tokens), vocab_size)  # [B]
    return seen.at[jnp.arange(batch), ids].set(True, mode="drop")


def _divide(x: jax.Array, divisor: jax.Array) -> jax.Array:
    """x [B, V] / divisor [B, 1], correctly rounded like torch.

    XLA rewrites division by a broadcast value into multiplication by its reciprocal, which is off by one ulp
    for about a quarter of the values; that is enough to move a top-p or top-k boundary away from HF's.
    Hiding the divisor behind an optimization barrier keeps a true division.
    """
    return x / lax.optimization_barrier(jnp.broadcast_to(divisor, x.shape))




def seed_key_data(seed: int) -> np.ndarray:
    """[2] uint32 threefry key data of a seed in [0, 2**64): [seed >> 32, seed & 0xFFFFFFFF].

    For seeds below 2**32 this is exactly the data of `jax.random.key(seed)`.
    """
    seed = check_seed("seed", seed)
    return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


def row_key_data(seed: int, sequence: int = 0) -> np.ndarray:
    """[2] uint32 key data of sequence `sequence` of a prompt with `seed` (`num_return_sequences`): the seed's
    own key for sequence 0, so that it equals a single-sequence run, and fold_in(key(seed), sequence) after."""
    data = seed_key_data(seed)
    if sequence == 0:
        return data
    return np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(data), sequence)))


@pytree.exportable
@pytree.dataclass
class SamplingParams:
    """Per-row sampling values as runtime arrays, one entry per row: changing them never recompiles."""

    do_sample: jax.Array  # [B] bool
    temperature: jax.Array  # [B] float32 (1 for greedy rows, whose temperature HF ignores)
    top_k: jax.Array  # [B] int32, 0 = off
    top_p: jax.Array  # [B] float32, 1 = off
    repetition_penalty: jax.Array  # [B] float32, 1 = off
    min_tokens_to_keep: jax.Array  # [B] int32

    @classmethod
    def from_configs(cls, configs: Sequence[SamplingConfig]) -> SamplingParams:
        """Stack one validated `SamplingConfig` per row (host numpy arrays, ready to feed a jitted program)."""
        return cls(
            do_sample=np.array([c.do_sample for c in configs], bool),
            temperature=np.array([c.temperature if c.do_sample else 1.0 for c in configs], np.float32),
            top_k=np.array([c.top_k for c in configs], np.int32),
            top_p=np.array([c.top_p for c in configs], np.float32),
            repetition_penalty=np.array([c.repetition_penalty for c in configs], np.float32),
            min_tokens_to_keep=np.array([c.min_tokens_to_keep for c in configs], np.int32),
        )


def _repetition_penalty(scores: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """scores [B, V], seen [B, V] bool, penalty [B] -> [B, V]; a penalty of 1 changes nothing, exactly."""
    penalty = penalty[:, None]  # [B, 1]
    # Negative scores are multiplied so that a penalty > 1 always lowers the score.
    penalized = jnp.where(scores < 0, scores * penalty, _divide(scores, penalty))  # [B, V]
    return jnp.where(seen, penalized, scores)


def _top_k_size(params: SamplingParams, vocab_size: int) -> jax.Array:
    """[B] how many top scores top-k keeps (HF: max(top_k, min_tokens_to_keep) capped at V; V when off)."""
    k = jnp.minimum(jnp.maximum(params.top_k, params.min_tokens_to_keep), vocab_size)
    return jnp.where(params.top_k > 0, k, vocab_size)


def _top_p_removes(cumprobs: jax.Array, rank_from_top: jax.Array, params: SamplingParams) -> jax.Array:
    """HF's top-p rule on ascending cumulative probabilities [B, N]: remove where cumprob <= 1 - top_p, except the
    `min_tokens_to_keep` most likely; rows with top_p = 1 skip the warper, as HF does."""
    return ((cumprobs <= 1 - params.top_p[:, None]) & (rank_from_top >= params.min_tokens_to_keep[:, None])
            & (params.top_p < 1)[:, None])


def _keep_sorted(scores: jax.Array, params: SamplingParams) -> jax.Array:
    """[B, V] scores after temperature -> [B, V] bool kept by top-k and top-p, with a full (stable) sort."""
    batch, vocab_size = scores.shape
    order = jnp.argsort(scores, axis=-1)  # [B, V] ascending, like HF; stable, so ties go lowest id first
    ascending = jnp.take_along_axis(scores, order, axis=-1)  # [B, V]
    kth = jnp.take_along_axis(ascending, (vocab_size - _top_k_size(params, vocab_size))[:, None], axis=-1)
    in_top_k = ascending >= kth  # [B, V]; every score tied with the k-th survives
    cumprobs = jnp.cumsum(jax.nn.softmax(jnp.where(in_top_k, ascending, -jnp.inf), axis=-1), axis=-1)
    keep = in_top_k & ~_top_p_removes(cumprobs, vocab_size - 1 - jnp.arange(vocab_size), params)  # [B, V]
    return jnp.zeros_like(keep).at[jnp.arange(batch)[:, None], order].set(keep)


def _keep_candidates(scores: jax.Array, params: SamplingParams, candidates: int) -> tuple[jax.Array, jax.Array]:
    """Like `_keep_sorted` from the `candidates` largest scores only; also returns [B] bool: that row's result is
    exact (equal to `_keep_sorted`'s)."""
    batch, vocab_size = scores.shape
    count = min(candidates, vocab_size)
    top_scores, top_ids = lax.top_k(scores, count)  # [B, C] descending
    # Ascending by score, ties by id: the order of the stable full sort.
    ascending, ids = lax.sort((top_scores, top_ids), dimension=-1, num_keys=2)  # [B, C]
    k = _top_k_size(params, vocab_size)  # [B]
    filtered = k < vocab_size  # [B]: top-k removes something
    kth = jnp.take_along_axis(ascending, jnp.clip(count - k, 0, count - 1)[:, None], axis=-1)  # [B, 1]
    lowest = jnp.where(filtered[:, None], kth, ascending[:, :1])  # [B, 1] lowest score that may survive
    in_top_k = ascending >= lowest  # [B, C]
    masked = jnp.where(in_top_k, ascending, -jnp.inf)  # [B, C]
    # Probabilities relative to the row maximum, as transformers' softmax computes them: x - max is exact in
    # float32, where x - logsumexp(x) is off by ~1e-2 once |scores| reach ~1e4 (temperature 0.05 on logits of
    # 3e4), enough to remove a token top-p must keep.
    top = ascending[:, -1:]  # [B, 1]
    weights = jnp.exp(masked - top)  # [B, C]
    # Top-p normalises over the top-k survivors: all candidates when top-k filters, else the whole vocabulary.
    norm = jnp.where(filtered, jnp.sum(weights, axis=-1), jnp.sum(jnp.exp(scores - top), axis=-1))  # [B]
    probs = weights / norm[:, None]  # [B, C]
    tail = jnp.where(filtered, 0.0, 1.0 - jnp.sum(probs, axis=-1))  # [B] mass below the candidates
    cumprobs = tail[:, None] + jnp.cumsum(probs, axis=-1)  # [B, C]: HF's cumulative sum at each candidate
    keep_candidates = in_top_k & ~_top_p_removes(cumprobs, count - 1 - jnp.arange(count), params)  # [B, C]
    keeps_all = ~filtered & (params.top_p >= 1)  # [B]: neither warper removes anything
    keep = jnp.zeros((batch, vocab_size), bool).at[jnp.arange(batch)[:, None], ids].set(keep_candidates)
    keep = keep | keeps_all[:, None]  # [B, V]
    # Exact when no token outside the candidates ties with or beats the lowest possible survivor, and either
    # top-k bounds the survivors within the candidates or top-p certainly removes everything outside them.
    boundary_clear = jnp.sum(scores >= lowest, axis=-1) <= count  # [B]
    bounded = jnp.where(filtered, k <= count, (params.min_tokens_to_keep <= count)
                        & (tail <= 1 - params.top_p - _TAIL_MARGIN))  # [B]
    return keep, keeps_all | (boundary_clear & bounded)


def _keep(scores: jax.Array, params: SamplingParams, candidates: tuple[int, ...] = CANDIDATES) -> jax.Array:
    """[B, V] scores after temperature -> [B, V] bool: the tokens top-k and top-p keep, per row.

    The first candidate count whose result is exact for every sampling row serves (the larger ones run only
    when needed); otherwise the whole vocabulary is sorted. Greedy rows never force more work: their kept set
    is not used.
    """
    if not candidates:
        return _keep_sorted(scores, params)
    keep, exact = _keep_candidates(scores, params, candidates[0])
    return lax.cond(jnp.all(exact | ~params.do_sample), lambda: keep, lambda: _keep(scores, params, candidates[1:]))


def _first_max(scores: jax.Array) -> jax.Array:
    """[B, V] -> [B] int32 index of each row's largest score, lowest index among ties (like argmax).

    `lax.top_k` with k = 1 rather than `argmax`: on XLA CPU it is several times faster over a vocabulary.
    """
    return lax.top_k(scores, 1)[1][:, 0].astype(jnp.int32)


def _penalized(logits: jax.Array, seen: jax.Array, params: SamplingParams) -> jax.Array:
    """[B, V] logits -> float32 scores after the repetition penalty."""
    return _repetition_penalty(jnp.asarray(logits).astype(jnp.float32), seen, params.repetition_penalty)


def apply_processors(logits: jax.Array, seen: jax.Array, params: SamplingParams,
                     candidates: tuple[int, ...] = CANDIDATES) -> jax.Array:
    """[B, V] logits -> [B, V] float32 processed scores, in HF order; removed entries are -inf.

    Repetition penalty over `seen` [B, V] bool, then, for rows with `do_sample`: temperature -> top-k ->
    top-p. Greedy rows get the penalised scores only, as in HF. Jittable; `params` are runtime arrays.
    """
    scores = _penalized(logits, seen, params)
    scaled = _divide(scores, params.temperature[:, None])
    processed = jnp.where(_keep(scaled, params, candidates), scaled, -jnp.inf)
    return jnp.where(params.do_sample[:, None], processed, scores)


def step_keys(key_data: jax.Array, step: jax.Array) -> jax.Array:
    """[B, 2] uint32 row key data, scalar step -> [B] keys fold_in(key(seed), step). Never global state."""
    return jax.vmap(lambda data: jax.random.fold_in(jax.random.wrap_key_data(data), step))(key_data)


def next_tokens(logits: jax.Array, seen: jax.Array, params: SamplingParams, key_data: jax.Array,
                step: jax.Array, candidates: tuple[int, ...] = CANDIDATES) -> jax.Array:
    """[B, V] logits, [B, V] seen, [B, 2] uint32 row key data, scalar step -> [B] int32 tokens.

    Greedy rows take the argmax after the repetition penalty; sampling rows draw
    `jax.random.categorical(fold_in(key(seed), step), processed scores)`, written out as its Gumbel-max so the
    noise covers the whole vocabulary whichever path decided the kept set. A batch with no sampling row skips
    the sampling work entirely. Jittable; everything is a runtime array.
    """
    scores = _penalized(logits, seen, params)  # [B, V]

    def sampled() -> jax.Array:
        scaled = _divide(scores, params.temperature[:, None])  # [B, V]
        keep = _keep(scaled, params, candidates)  # [B, V]
        noise = jax.vmap(lambda key: jax.random.gumbel(key, scaled.shape[-1:], scaled.dtype))(
            step_keys(key_data, step))  # [B, V]
        drawn = _first_max(jnp.where(keep, noise + scaled, -jnp.inf))  # [B]
        return jnp.where(params.do_sample, drawn, _first_max(scores))

    return lax.cond(jnp.any(params.do_sample), sampled, lambda: _first_max(scores))


def _as_batch(logits: Any, input_ids: Any, attention_mask: Any) -> tuple[jax.Array, jax.Array, bool]:
    """Coerce user inputs to logits [B, V] and the seen-token mask [B, V]; a [V] logits vector becomes a batch
    of one (and its [S] ids a [1, S] row). No ids means nothing seen."""
    logits = jnp.asarray(logits)
    single = logits.ndim == 1
    if single:
        logits = logits[None]
    if logits.ndim != 2:
        raise ValueError(f"`logits` must be [B, V] or [V], got shape {logits.shape}")
    if input_ids is None:
        return logits, jnp.zeros(logits.shape, bool), single
    ids = jnp.asarray(input_ids, dtype=jnp.int32)
    if single and ids.ndim == 1:
        ids = ids[None]  # [1, S]
    if attention_mask is not None:
        attention_mask = jnp.asarray(attention_mask).reshape(ids.shape)  # [B, S]
    return logits, seen_tokens(ids, logits.shape[1], attention_mask), single


_apply_processors_jit = jax.jit(apply_processors, static_argnames="candidates")
_next_tokens_jit = jax.jit(next_tokens, static_argnames="candidates")


def _single_config(logits: Any, input_ids: Any, attention_mask: Any, config: SamplingConfig
                   ) -> tuple[jax.Array, jax.Array, bool, SamplingParams]:
    """The batch (`_as_batch`) and `config` for every row of it, as runtime arrays."""
    logits, seen, single = _as_batch(logits, input_ids, attention_mask)  # [B, V], [B, V]
    return logits, seen, single, SamplingParams.from_configs([config] * logits.shape[0])


def process_logits(logits: Any, input_ids: Any, *, attention_mask: Any = None, **values: Any) -> jax.Array:
    """One-step analog of transformers' logits processor list built from these arguments.

    `values` are `SamplingConfig`'s (`repetition_penalty`, `temperature`, `top_k`, `top_p`, `min_tokens_to_keep`;
    each off unless given) and all warpers are applied, i.e. as with `do_sample=True`. Accepts numpy/jax/list
    inputs: logits [B, V] (or [V], treated as a batch of one and returned as [V]); input_ids [B, S] (may be None
    when there is no penalty); attention_mask [B, S] with 0 for left padding. Returns float32 with removed entries
    at -inf.
    """
    config = SamplingConfig(do_sample=True, **values)
    logits, seen, single, params = _single_config(logits, input_ids, attention_mask, config)
    out = _apply_processors_jit(logits, seen, params)  # [B, V]
    return out[0] if single else out


def sample(logits: Any, input_ids: Any = None, *, seed: int | Sequence[int] = 0, step: int = 0,
           attention_mask: Any = None, **values: Any) -> jax.Array:
    """Pick next tokens from [B, V] logits (or [V], giving a scalar) with HF semantics.

    `values` are `SamplingConfig`'s (`do_sample`, True unless given; `repetition_penalty`, `temperature`, `top_k`,
    `top_p`, `min_tokens_to_keep`, each off unless given). `seed` is one seed for every row or one per row; row r
    draws with `fold_in(key(seed_r), step)`, so a row gives the same token whatever the rest of the batch. Returns
    int32 tokens [B].
    """
    config = SamplingConfig(**{"do_sample": True, **values})
    logits, seen, single, params = _single_config(logits, input_ids, attention_mask, config)
    key_data = np.stack([seed_key_data(s) for s in per_row("seed", seed, logits.shape[0])])  # [B, 2]
    tokens = _next_tokens_jit(logits, seen, params, key_data, jnp.asarray(step, jnp.int32))  # [B]
    return tokens[0] if single else tokens
