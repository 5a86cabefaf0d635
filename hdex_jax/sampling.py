"""Next-token selection with Hugging Face `generate` semantics and explicit PRNG keys.

Processing order, as in transformers' `generate` (processors first, then the sampling warpers):

1. repetition penalty over every distinct id already in the row (prompt and output, left padding
   excluded): positive scores are divided by the penalty, negative ones multiplied;
2. only when sampling: temperature (scores / temperature);
3. top-k: keep every score >= the k-th largest, so ties with the k-th value survive;
4. top-p: HF's formula (ascending sort, softmax, cumulative sum, remove where cumprob <= 1 - top_p,
   always keep the `min_tokens_to_keep` most likely);
5. greedy = argmax, sampling = `jax.random.categorical`.

Removed entries are -inf. Logits are float32 before any processor, so bf16 models pick the same tokens
as an HF model run in float32 on the same logits.

Randomness is explicit and never global: `seed` -> `jax.random.key(seed)`, and the key of batch row `r`
at decode step `t` is `fold_in(fold_in(key, r), t)`. A token therefore depends only on (seed, row, step,
logits): the same seed gives the same tokens across runs, device counts, streaming or whole-loop
generation, and whatever else is in the batch.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _check_number(name: str, value: Any, *, integer: bool) -> None:
    """Reject bools and non-numbers up front, so the HF-style range checks below only see numbers."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        wanted = "an integer" if integer else "a float"
        raise ValueError(f"`{name}` has to be {wanted}, but is {value!r} of type {type(value).__name__}")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static sampling parameters; frozen and hashable so it can be a static argument of `jax.jit`.

    Validation matches transformers' processors (same `ValueError` messages), except that integers are
    accepted where a float is wanted and `top_k=0` means "off". `temperature` is only checked when
    `do_sample` is True, because HF ignores it for greedy decoding.
    """

    do_sample: bool = False
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    min_tokens_to_keep: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise ValueError(f"`do_sample` has to be a bool, but is {self.do_sample!r}")

        _check_number("repetition_penalty", self.repetition_penalty, integer=False)
        if not self.repetition_penalty > 0:
            raise ValueError(f"`penalty` has to be a strictly positive float, but is {self.repetition_penalty}")

        if self.do_sample:
            _check_number("temperature", self.temperature, integer=False)
            if not self.temperature > 0:
                msg = (
                    f"`temperature` (={self.temperature}) has to be a strictly positive float, otherwise your next "
                    "token scores will be invalid."
                )
                if self.temperature == 0:
                    msg += " If you're looking for greedy decoding strategies, set `do_sample=False`."
                raise ValueError(msg)

        _check_number("top_k", self.top_k, integer=True)
        if self.top_k < 0:
            raise ValueError(f"`top_k` has to be a strictly positive integer, but is {self.top_k}")

        _check_number("top_p", self.top_p, integer=False)
        # `not 0 <= p <= 1` (rather than HF's `p < 0 or p > 1`) also rejects NaN.
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"`top_p` has to be a float > 0 and < 1, but is {float(self.top_p)}")

        _check_number("min_tokens_to_keep", self.min_tokens_to_keep, integer=True)
        if self.min_tokens_to_keep < 1:
            raise ValueError(
                f"`min_tokens_to_keep` has to be a positive integer, but is {self.min_tokens_to_keep}"
            )

        # Normalise numpy scalars etc. to plain Python values so equal configs hash equal under jit.
        set_ = object.__setattr__
        set_(self, "do_sample", bool(self.do_sample))
        set_(self, "repetition_penalty", float(self.repetition_penalty))
        if self.do_sample:
            set_(self, "temperature", float(self.temperature))
        set_(self, "top_k", int(self.top_k))
        set_(self, "top_p", float(self.top_p))
        set_(self, "min_tokens_to_keep", int(self.min_tokens_to_keep))


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


def _divide(x: jax.Array, divisor: float) -> jax.Array:
    """x / divisor, correctly rounded like torch.

    XLA rewrites division by a (broadcast) scalar into multiplication by its reciprocal, which is off by
    one ulp for about a quarter of the values; that is enough to move a top-p or top-k boundary away from
    HF's. Hiding the divisor behind an optimization barrier keeps a true division.
    """
    return x / jax.lax.optimization_barrier(jnp.full_like(x, divisor))


def _repetition_penalty(scores: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    # Negative scores are multiplied so that a penalty > 1 always lowers the score.
    penalized = jnp.where(scores < 0, scores * penalty, _divide(scores, penalty))  # [B, V]
    return jnp.where(seen, penalized, scores)


def _top_k(scores: jax.Array, k: int) -> jax.Array:
    kth = jax.lax.top_k(scores, k)[0][..., -1:]  # [B, 1]
    # `<` rather than a rank cut so that every score tied with the k-th one survives, as in HF.
    return jnp.where(scores < kth, -jnp.inf, scores)


def _top_p(scores: jax.Array, top_p: float, min_tokens_to_keep: int) -> jax.Array:
    batch, vocab_size = scores.shape
    order = jnp.argsort(scores, axis=-1)  # [B, V] ascending, like HF
    sorted_scores = jnp.take_along_axis(scores, order, axis=-1)  # [B, V]
    cumprobs = jnp.cumsum(jax.nn.softmax(sorted_scores, axis=-1), axis=-1)  # [B, V]
    # HF's formula: the low tail whose total mass is <= 1 - p goes; the top entries are always kept.
    remove_sorted = cumprobs <= 1 - top_p
    remove_sorted = remove_sorted.at[:, max(vocab_size - min_tokens_to_keep, 0) :].set(False)
    remove = jnp.zeros_like(remove_sorted).at[jnp.arange(batch)[:, None], order].set(remove_sorted)  # [B, V]
    return jnp.where(remove, -jnp.inf, scores)


def apply_processors(logits: jax.Array, seen: jax.Array, config: SamplingConfig) -> jax.Array:
    """[B, V] logits -> [B, V] float32 processed scores, in HF order; removed entries are -inf.

    Repetition penalty over `seen` [B, V] bool (divide positive scores, multiply negative), then, only if
    `config.do_sample`: temperature -> top-k (ties with the k-th value kept, k = max(top_k,
    min_tokens_to_keep) capped at V) -> top-p (HF formula, the last `min_tokens_to_keep` always kept).
    Processors that are off are skipped at trace time. Jittable with `config` static.
    """
    scores = jnp.asarray(logits).astype(jnp.float32)  # [B, V]
    vocab_size = scores.shape[-1]
    if config.repetition_penalty != 1.0:
        scores = _repetition_penalty(scores, seen, config.repetition_penalty)
    if not config.do_sample:
        return scores
    if config.temperature != 1.0:
        scores = _divide(scores, config.temperature)
    if config.top_k != 0:
        scores = _top_k(scores, min(max(config.top_k, config.min_tokens_to_keep), vocab_size))
    if config.top_p < 1.0:
        scores = _top_p(scores, config.top_p, config.min_tokens_to_keep)
    return scores


_apply_processors_jit = jax.jit(apply_processors, static_argnames="config")


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


def process_logits(
    logits: Any,
    input_ids: Any,
    *,
    repetition_penalty: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_tokens_to_keep: int = 1,
    attention_mask: Any = None,
) -> jax.Array:
    """One-step analog of transformers' logits processor list built from these arguments.

    All warpers are applied, i.e. as with `do_sample=True`. Accepts numpy/jax/list inputs: logits [B, V]
    (or [V], treated as a batch of one and returned as [V]); input_ids [B, S] (may be None when there is
    no penalty); attention_mask [B, S] with 0 for left padding. Returns float32 with removed entries at -inf.
    """
    config = SamplingConfig(do_sample=True, repetition_penalty=repetition_penalty, temperature=temperature,
                            top_k=top_k, top_p=top_p, min_tokens_to_keep=min_tokens_to_keep)
    logits, seen, single = _as_batch(logits, input_ids, attention_mask)  # [B, V], [B, V]
    out = _apply_processors_jit(logits, seen, config)  # [B, V]
    return out[0] if single else out


def step_key(seed_key: jax.Array, row: jax.Array, step: jax.Array) -> jax.Array:
    """Key for one row at one step: fold_in(fold_in(seed_key, row), step). Never global state."""
    return jax.random.fold_in(jax.random.fold_in(seed_key, row), step)


def next_tokens(
    logits: jax.Array,
    seen: jax.Array,
    config: SamplingConfig,
    seed_key: jax.Array,
    rows: jax.Array,
    step: jax.Array,
) -> jax.Array:
    """[B, V] logits, [B, V] seen, [B] row ids, scalar step -> [B] int32 tokens.

    Greedy (`config.do_sample=False`) is the argmax after the repetition penalty; sampling draws from
    `jax.random.categorical` with each row's own `step_key`, so a row's token does not depend on the rest
    of the batch. `rows` are the rows' ids in the whole request, not their positions in this batch.
    Jittable with `config` static.
    """
    scores = apply_processors(logits, seen, config)  # [B, V]
    if not config.do_sample:
        return jnp.argmax(scores, axis=-1).astype(jnp.int32)
    keys = jax.vmap(step_key, in_axes=(None, 0, None))(seed_key, jnp.asarray(rows), step)  # [B] keys
    tokens = jax.vmap(jax.random.categorical)(keys, scores)  # [B]
    return tokens.astype(jnp.int32)


_next_tokens_jit = jax.jit(next_tokens, static_argnames="config")


def sample(
    logits: Any,
    input_ids: Any = None,
    *,
    seed: int = 0,
    step: int = 0,
    rows: Any = None,
    do_sample: bool = True,
    repetition_penalty: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_tokens_to_keep: int = 1,
    attention_mask: Any = None,
) -> jax.Array:
    """Pick next tokens from [B, V] logits (or [V], giving a scalar) with HF semantics.

    Builds the `SamplingConfig`, the seen-token mask from `input_ids` [B, S] (and `attention_mask`) and
    `jax.random.key(seed)`, then calls `next_tokens`. `rows` [B] defaults to arange(B); pass the original
    row ids to reproduce a row of a larger batch. Returns int32 tokens [B].
    """
    config = SamplingConfig(do_sample=do_sample, repetition_penalty=repetition_penalty, temperature=temperature,
                            top_k=top_k, top_p=top_p, min_tokens_to_keep=min_tokens_to_keep)
    logits, seen, single = _as_batch(logits, input_ids, attention_mask)  # [B, V], [B, V]
    batch = logits.shape[0]
    rows = jnp.arange(batch) if rows is None else jnp.asarray(rows).reshape(batch)  # [B]
    tokens = _next_tokens_jit(logits, seen, config, jax.random.key(seed), rows, jnp.asarray(step))  # [B]
    return tokens[0] if single else tokens
