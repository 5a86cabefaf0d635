"""Scoring: the logits of every position of given token sequences, and the log-likelihoods built on them.

A batch of rows is laid at cache slots [0, T) as given (left or right padding marked by its mask), its rows
padded to a power of two and its length to a bucket (`bucket_length`), so lengths within a bucket share one
program. Rows longer than `CHUNK_TOKENS` run in chunks of that many tokens through the KV cache: the first
chunk is a prompt pass over an empty cache (no scores against empty slots), each later chunk attends to the
slots written before it. The programs run on a placement's mesh; with the hybrid split that is the prefill
("gpu") mesh, since scoring is all prompt pass.

Log-likelihoods follow lm-evaluation-harness: a continuation's log-likelihood is the sum of the log-softmax of
the logits predicting each of its tokens from the context and the tokens before it, and it is greedy when each
of its tokens is the argmax of those logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hdex_jax.config import ModelConfig
from hdex_jax.generation import Placement
from hdex_jax.kv_cache import KVCache, init_cache
from hdex_jax.forward import score_fn
from hdex_jax.jitting import JitByPromptTokens, bucket_length
from hdex_jax.params import Params

# Longest block of one scoring program; longer rows run in chunks of this many tokens through the cache. It
# bounds the [B, T, V] float32 logits of a block (SmolLM2: 100 MB per row).
CHUNK_TOKENS = 512

# Rows of one scoring program in `score_targets` (the caller's batch size by default).
DEFAULT_BATCH_SIZE = 4


def _block_fn(params: Params, cache: KVCache | None, tokens: jax.Array, positions: jax.Array, key_valid: jax.Array,
              targets: jax.Array | None, *, cfg: ModelConfig, mesh: jax.sharding.Mesh, cache_length: int,
              keep_cache: bool, start: int) -> tuple[jax.Array | tuple[jax.Array, jax.Array], KVCache | None]:
    """One block of a scoring pass at slot `start`, attending to the `start` slots before it; `cache` None
    starts a fresh cache of `cache_length` slots.

    Returns the logits [B, T, V], or with `targets` [B, T] (token ids, -1 where none is scored) the log-prob of
    each target [B, T] and whether it is the argmax [B, T]; and the cache if `keep_cache` (more blocks follow).
    """
    if cache is None:
        cache = init_cache(cfg, tokens.shape[0], cache_length)
    logits, cache = score_fn(params, cache, tokens, positions, key_valid, cfg, mesh, scored=start)  # [B, T, V]
    if targets is not None:
        picked = jnp.maximum(targets, 0)[..., None]  # [B, T, 1]
        logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), picked, axis=-1)[..., 0]  # [B, T]
        logits = (logprobs, jnp.argmax(logits, axis=-1) == targets)
    return logits, cache if keep_cache else None


_block = JitByPromptTokens(_block_fn, static_argnames=("cfg", "mesh", "cache_length", "keep_cache", "start"),
                           donate_argnames="cache")


def positions_of(mask: np.ndarray) -> np.ndarray:
    """Hugging Face position ids of a padded batch [B, T] (left or right padding): cumsum(mask) - 1, from 0."""
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0).astype(np.int32)


def score(placement: Placement, tokens: np.ndarray, mask: np.ndarray, targets: np.ndarray | None = None
          ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Logits of every position [B, T, V] float32 of the token rows [B, T] whose real tokens `mask` [B, T] marks;
    with `targets` [B, T] (-1 where none), the log-probs [B, T] of the targets and whether each is greedy."""
    rows, length = tokens.shape
    chunk = min(bucket_length(length), CHUNK_TOKENS)
    chunks = -(-length // chunk)
    B, S = bucket_length(rows, minimum=1), chunk * chunks

    def padded(x: np.ndarray, fill: int) -> np.ndarray:
        out = np.full((B, S), fill, np.int32)
        out[:rows, :length] = x
        return out

    tokens, mask = padded(tokens, 0), padded(mask, 0)
    positions, key_valid = positions_of(mask), mask.astype(bool)
    targets = None if targets is None else padded(targets, -1)
    cache, outputs = None, []
    for c in range(chunks):
        block = slice(c * chunk, (c + 1) * chunk)
        out, cache = _block[chunk](placement.params, cache, tokens[:, block], positions[:, block], key_valid,
                                   None if targets is None else targets[:, block], cfg=placement.cfg,
                                   mesh=placement.mesh, cache_length=S, keep_cache=c + 1 < chunks, start=c * chunk)
        outputs.append(jax.tree.map(np.asarray, out))
    if targets is None:
        return np.concatenate(outputs, axis=1)[:rows, :length]
    logprobs, greedy = (np.concatenate(parts, axis=1)[:rows, :length] for parts in zip(*outputs))
    return logprobs, greedy


def score_targets(placement: Placement, inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
                  batch_size: int = DEFAULT_BATCH_SIZE) -> list[tuple[float, bool]]:
    """For each row, the summed log-prob of its `targets` (the last len(targets) tokens that follow `inputs`'
    positions: target j is predicted at input position len(inputs) - len(targets) + j) and whether all of
    them are greedy. Rows run `batch_size` at a time, longest first so that a batch shares a length bucket."""
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
    results: list[tuple[float, bool]] = [(0.0, True)] * len(inputs)
    for first in range(0, len(order), batch_size):
        group = order[first:first + batch_size]
        width = max(len(inputs[i]) for i in group)
        tokens = np.zeros((len(group), width), np.int32)
        mask = np.zeros_like(tokens)
        wanted = np.full_like(tokens, -1)
        for r, i in enumerate(group):
            n, m = len(inputs[i]), len(targets[i])
            tokens[r, :n], mask[r, :n] = inputs[i], 1
            wanted[r, n - m:n] = targets[i]
        logprobs, greedy = score(placement, tokens, mask, wanted)
        for r, i in enumerate(group):
            scored = wanted[r] >= 0
            results[i] = (float(np.sum(logprobs[r][scored], dtype=np.float64)), bool(np.all(greedy[r][scored])))
    return results


def loglikelihood_tokens(placement: Placement, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                         max_length: int, batch_size: int = DEFAULT_BATCH_SIZE) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) of each (context, continuation) pair of token ids, as lm-evaluation-harness
    computes them: the model reads the last max_length tokens of context + continuation but the final one."""
    inputs, targets = [], []
    for context, continuation in pairs:
        whole = (list(context) + list(continuation))[-(max_length + 1):]
        inputs.append(whole[:-1])
        targets.append(list(continuation))
    return score_targets(placement, inputs, targets, batch_size)


def rolling_windows(tokens: Sequence[int], prefix: int, window: int, stride: int
                    ) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) windows that predict every token of `tokens` once, the first from `prefix`.

    Each window scores up to `stride` new tokens and reads at most `window` tokens, so each scored token sees
    up to window - stride tokens of context before the window's first target (`stride == window`: disjoint
    windows, as lm-evaluation-harness's `loglikelihood_rolling`)."""
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    sequence = [prefix, *tokens]
    windows = []
    for start in range(1, len(sequence), stride):
        end = min(start + stride, len(sequence))
        windows.append((sequence[max(0, end - 1 - window):end - 1], sequence[start:end]))
    return windows


def encode_pair(encode, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a (context, continuation) pair of texts as lm-evaluation-harness splits them: trailing
    spaces of the context move to the continuation, and the continuation is what the encoding of the whole text
    holds past the context's encoding. `encode` is the tokenizer's encode without special tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = list(encode(context + continuation))
    context_ids = list(encode(context))
    return context_ids, whole[len(context_ids):]
