"""hdex_jax.sampling against transformers' own logits processors (run through torch) and against statistics."""

from __future__ import annotations

import itertools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from hdex_jax.sampling import (
    SamplingConfig,
    SamplingParams,
    _keep_candidates,
    _keep_sorted,
    apply_processors,
    mark_seen,
    next_tokens,
    process_logits,
    sample,
    seed_key_data,
    seen_tokens,
    step_keys,
)

INF = float("inf")


def hf_processors(
    *, penalty: float = 1.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_keep: int = 1
) -> LogitsProcessorList:
    """The list transformers' `generate` builds for do_sample=True (same order, same skip conditions)."""
    procs = LogitsProcessorList()
    if penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(penalty=float(penalty)))
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(float(temperature)))
    if top_k != 0:
        procs.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=min_keep))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=min_keep))
    return procs


def hf_run(procs: LogitsProcessorList, ids, scores) -> np.ndarray:
    ids_t = None if ids is None else torch.as_tensor(np.asarray(ids), dtype=torch.long)
    return procs(ids_t, torch.tensor(np.array(scores, np.float32))).numpy()


def assert_same_as_hf(ours, ref: np.ndarray, before_top_p: np.ndarray) -> None:
    """Values equal (atol 1e-6) and -inf at exactly the same places.

    One exception, which transformers itself leaves undefined: when top-p cuts through a group of exactly tied
    scores, which members of the group go depends on torch's (unstable) sort. For such groups only the number
    removed must agree; that is checked by comparing each row's sorted values.
    """
    ours = np.asarray(ours)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    # Same multiset per row, including the number of -inf (assert_allclose requires infinities to match).
    np.testing.assert_allclose(np.sort(ours, -1), np.sort(ref, -1), rtol=0, atol=1e-6)
    comparable = np.ones(ref.shape, bool)
    for b in range(ref.shape[0]):
        for value in np.unique(before_top_p[b]):
            group = before_top_p[b] == value
            if len(np.unique(np.isinf(ref[b][group]))) > 1:  # a tie group split by top-p
                comparable[b][group] = False
    np.testing.assert_array_equal(np.isneginf(ours)[comparable], np.isneginf(ref)[comparable])
    finite = np.isfinite(ref) & comparable
    np.testing.assert_allclose(ours[finite], ref[finite], rtol=0, atol=1e-6)


def uniform_logits(batch: int, length: int) -> np.ndarray:
    """transformers' test helper `_get_uniform_logits`."""
    return np.ones((batch, length), np.float32) / length


# ---------------------------------------------------------------------------------------------------------
# 1. transformers' unit-test inputs, expected values and the processors themselves


def test_repetition_penalty_matches_hf_unit_test():
    vocab = 10
    ids = [[0, 1], [5, 8]]
    scores = uniform_logits(2, vocab)
    scores[0, 0] = -(1 / vocab)
    scores[1, 5] = 4 / vocab
    out = np.asarray(process_logits(scores, ids, repetition_penalty=2.0))
    # transformers' expected values: negative seen scores doubled, positive ones halved, unseen unchanged.
    np.testing.assert_allclose(out[0, 0], -(1 / vocab) * 2, rtol=1e-6)
    np.testing.assert_allclose(out[0, 1], (1 / vocab) / 2, rtol=1e-6)
    np.testing.assert_allclose(out[0, 2], 1 / vocab, rtol=1e-6)
    np.testing.assert_allclose(out[1, 5], (4 / vocab) / 2, rtol=1e-6)
    np.testing.assert_allclose(out[1, 8], (1 / vocab) / 2, rtol=1e-6)
    ref = hf_run(hf_processors(penalty=2.0), ids, scores)
    assert_same_as_hf(out, ref, ref)
    # Repeated ids are penalised once, like HF's gather/scatter.
    out = np.asarray(process_logits(scores, [[0, 0, 0], [5, 5, 8]], repetition_penalty=2.0))
    np.testing.assert_allclose(out[0, 0], -(1 / vocab) * 2, rtol=1e-6)
    np.testing.assert_allclose(out[1, 5], (4 / vocab) / 2, rtol=1e-6)


def test_temperature_matches_hf_unit_test():
    length = 20
    scores = uniform_logits(2, length)
    scores[1, 5] = (1 / length) + 0.1  # peak
    scores[1, 10] = (1 / length) - 0.4  # valley
    probs = jax.nn.softmax(scores, axis=-1)
    sharp = jax.nn.softmax(process_logits(scores, None, temperature=0.5), axis=-1)
    smooth = jax.nn.softmax(process_logits(scores, None, temperature=1.3), axis=-1)
    # transformers' assertions: the uniform row stays uniform, peaks sharpen / smooth as expected.
    np.testing.assert_allclose(sharp[0], probs[0], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(smooth[0], probs[0], rtol=1e-3, atol=1e-3)
    assert probs[1].max() < sharp[1].max() and probs[1].min() > sharp[1].min()
    assert probs[1].max() > smooth[1].max() and probs[1].min() < smooth[1].min()
    for temperature in (0.5, 1.3):
        ours = process_logits(scores, None, temperature=temperature)
        ref = hf_run(hf_processors(temperature=temperature), None, scores)
        np.testing.assert_array_equal(ours, ref)  # a true division, bit for bit


def test_top_k_matches_hf_unit_test():
    vocab, batch = 10, 2
    ramp = np.tile(np.arange(vocab, dtype=np.float32), (batch, 1))
    ramp[1:, : vocab // 2] += vocab
    out = np.asarray(process_logits(ramp, None, top_k=3))
    assert np.isinf(out[0]).tolist() == 7 * [True] + 3 * [False]
    assert np.isinf(out[1]).tolist() == 2 * [True] + 3 * [False] + 5 * [True]
    assert_same_as_hf(out, hf_run(hf_processors(top_k=3), None, ramp), ramp)

    # min_tokens_to_keep overrides k: a uniform row is untouched, a ramp keeps 3.
    length = 5
    out = np.asarray(process_logits(uniform_logits(batch, length), None, top_k=1, min_tokens_to_keep=3))
    assert np.isinf(out).sum(-1).tolist() == [0, 0]
    ramp5 = np.tile(np.arange(length, dtype=np.float32), (batch, 1))
    out = np.asarray(process_logits(ramp5, None, top_k=1, min_tokens_to_keep=3))
    assert np.isinf(out).sum(-1).tolist() == [2, 2]

    # Ties with the k-th value are all kept; k larger than V is capped.
    ties = np.array([[1, 2, 3, 3, 3]], np.float32)
    out = np.asarray(process_logits(ties, None, top_k=1))
    np.testing.assert_array_equal(out, [[-INF, -INF, 3, 3, 3]])
    assert_same_as_hf(out, hf_run(hf_processors(top_k=1), None, ties), ties)
    np.testing.assert_array_equal(process_logits(ties, None, top_k=50), ties)


def test_top_p_matches_hf_unit_test():
    dist = np.log(np.array([[0.3, 0.1, 0.1, 0.5], [0.15, 0.3, 0.3, 0.25]], np.float32))
    out = np.asarray(process_logits(dist, None, top_p=0.8))
    np.testing.assert_allclose(np.exp(out), [[0.3, 0.0, 0.0, 0.5], [0.0, 0.3, 0.3, 0.25]], rtol=1e-3, atol=1e-3)
    assert_same_as_hf(out, hf_run(hf_processors(top_p=0.8), None, dist), dist)

    # Negative and extreme logits: row 0 keeps 3 tokens, row 1 would keep 1 but min_tokens_to_keep=2 keeps 2.
    vocab = 10
    ramp = np.tile(np.arange(vocab, dtype=np.float32), (2, 1)) - vocab // 2
    ramp[1] *= 100.0
    out = np.asarray(process_logits(ramp, None, top_p=0.9, min_tokens_to_keep=2))
    assert np.isfinite(out).sum(-1).tolist() == [3, 2]
    assert_same_as_hf(out, hf_run(hf_processors(top_p=0.9, min_keep=2), None, ramp), ramp)

    dist = np.log(np.array([[0.9, 0.0274, 0.047, 0.0274], [0.15, 0.3, 0.3, 0.25]], np.float32))
    out = np.asarray(process_logits(dist, None, top_p=0.7, min_tokens_to_keep=2))
    assert np.isfinite(out).tolist() == [[True, False, True, False], [False, True, True, True]]
    assert_same_as_hf(out, hf_run(hf_processors(top_p=0.7, min_keep=2), None, dist), dist)


def test_top_p_boundary_is_inclusive_and_ties_break_by_lowest_id():
    # cumprob 0.25 <= 1 - 0.75 exactly: one of the four tied tokens goes, as in HF. HF leaves which one to torch's
    # unstable sort; we sort stably, so the lowest id goes first.
    logits = np.zeros((1, 4), np.float32)
    ours = np.asarray(process_logits(logits, None, top_p=0.75))
    ref = hf_run(hf_processors(top_p=0.75), None, logits)
    assert np.isinf(ref).sum() == 1
    assert_same_as_hf(ours, ref, logits)
    np.testing.assert_array_equal(ours, [[-INF, 0, 0, 0]])


CONFIGS = [
    dict(penalty=1.3),
    dict(penalty=0.7, temperature=0.6),
    dict(temperature=1.7, top_k=5),
    dict(top_p=0.85),
    dict(penalty=1.2, temperature=0.8, top_k=20, top_p=0.9, min_keep=2),
    dict(penalty=2.0, temperature=1.3, top_k=3, top_p=0.5, min_keep=4),
]


@pytest.mark.parametrize("hf_args", CONFIGS)
def test_random_inputs_match_hf_eager_and_jit(hf_args):
    rng = np.random.default_rng(0)
    batch, vocab = 4, 64
    logits = (rng.standard_normal((batch, vocab)) * 4).astype(np.float32)
    ids = rng.integers(0, vocab, size=(batch, 12))
    ref = hf_run(hf_processors(**hf_args), ids, logits)
    no_top_p = hf_run(hf_processors(**{**hf_args, "top_p": 1.0}), ids, logits)
    kwargs = dict(
        repetition_penalty=hf_args.get("penalty", 1.0),
        temperature=hf_args.get("temperature", 1.0),
        top_k=hf_args.get("top_k", 0),
        top_p=hf_args.get("top_p", 1.0),
        min_tokens_to_keep=hf_args.get("min_keep", 1),
    )
    ours = process_logits(logits, ids, **kwargs)
    assert_same_as_hf(ours, ref, no_top_p)
    # The jitted path the generation loop uses gives the same scores, also with each row's values as runtime
    # arrays in one batch with other values.
    config = SamplingConfig(do_sample=True, **kwargs)
    params = SamplingParams.from_configs([config] * batch)
    jitted = jax.jit(apply_processors)(logits, seen_tokens(ids, vocab), params)
    np.testing.assert_array_equal(jitted, ours)
    mixed = SamplingParams.from_configs([config, SamplingConfig(do_sample=True, temperature=0.5, top_k=2)] * 2)
    np.testing.assert_array_equal(jax.jit(apply_processors)(logits, seen_tokens(ids, vocab), mixed)[::2], ours[::2])
    # bf16 logits are promoted to float32 first.
    bf16 = jnp.asarray(logits, jnp.bfloat16)
    ours_bf16 = process_logits(bf16, ids, **kwargs)
    assert ours_bf16.dtype == jnp.float32
    ref_bf16 = hf_run(hf_processors(**hf_args), ids, np.asarray(bf16.astype(jnp.float32)))
    np.testing.assert_array_equal(np.isinf(ours_bf16), np.isinf(ref_bf16))


@st.composite
def processor_cases(draw):
    batch = draw(st.sampled_from([1, 3]))
    vocab = draw(st.sampled_from([4, 11, 32]))
    # A coarse integer grid makes exact ties (top-k ties, top-p cutting through ties); wide floats the generic case.
    # Tiny magnitudes become 0: XLA on CPU flushes subnormals to zero where torch keeps them, a platform detail
    # that would otherwise turn a 1e-45 vs 0 comparison into a difference.
    wide = st.floats(-30, 30, width=32).map(lambda x: 0.0 if abs(x) < 1e-6 else x)
    element = st.one_of(st.integers(-3, 3).map(float), wide, st.just(-INF) if vocab > 4 else st.just(0.0))
    logits = draw(arrays(np.float32, (batch, vocab), elements=element))
    # Ids at or above V exist when the embedding is larger than the lm_head; HF ignores them.
    ids = draw(arrays(np.int64, (batch, draw(st.integers(0, 6))), elements=st.integers(0, vocab + 2)))
    args = dict(
        penalty=draw(st.sampled_from([1.0, 1.3]) | st.floats(0.2, 3.0)),
        temperature=draw(st.sampled_from([1.0, 0.7]) | st.floats(0.1, 3.0)),
        top_k=draw(st.integers(0, vocab + 2)),
        top_p=draw(st.sampled_from([1.0, 0.9]) | st.floats(0.0, 1.0)),
        min_keep=draw(st.integers(1, 5)),
    )
    return logits, ids, args


@settings(
    max_examples=int(os.environ.get("HDEX_HYPOTHESIS_EXAMPLES", 60)),  # e.g. 1500 for a longer search
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(processor_cases())
def test_property_process_logits_equals_hf_chain(case):
    logits, ids, args = case
    before_top_p = hf_run(hf_processors(**{**args, "top_p": 1.0}), ids, logits)
    if args["top_p"] < 1.0:
        # Skip inputs where a cumulative probability sits within float32 noise of 1 - top_p: there the decision
        # depends on the summation order (torch vs XLA), not on the semantics under test.
        srt = np.sort(before_top_p.astype(np.float64), -1)
        with np.errstate(invalid="ignore", over="ignore"):
            probs = np.exp(srt - srt.max(-1, keepdims=True))
            cum = np.cumsum(probs / probs.sum(-1, keepdims=True), -1)
        assume(not np.any(np.abs(cum - (1 - args["top_p"])) < 1e-5))
    ref = hf_run(hf_processors(**args), ids, logits)
    ours = process_logits(
        logits,
        ids,
        repetition_penalty=args["penalty"],
        temperature=args["temperature"],
        top_k=args["top_k"],
        top_p=args["top_p"],
        min_tokens_to_keep=args["min_keep"],
    )
    assert_same_as_hf(ours, ref, before_top_p)


def test_single_vector_and_list_inputs():
    logits = [0.5, -1.0, 2.0, 0.1]
    out = process_logits(logits, [2, 1], repetition_penalty=2.0, top_k=2)
    assert out.shape == (4,)
    np.testing.assert_allclose(out, [0.5, -INF, 1.0, -INF])


def test_attention_mask_ignores_left_padding():
    rng = np.random.default_rng(1)
    vocab, pad = 16, 0
    logits = np.abs(rng.standard_normal((2, vocab))).astype(np.float32) + 0.5  # the pad id has a positive score
    logits[:, 3] = -2.0
    rows = [[5, 3, 5], [7]]  # ragged prompts, left padded with a real token id
    width = 4
    ids = np.array([[pad] * (width - len(r)) + r for r in rows])
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    ours = np.asarray(process_logits(logits, ids, repetition_penalty=1.5, attention_mask=mask))
    for b, row in enumerate(rows):  # reference: HF on each row without its padding
        ref = hf_run(hf_processors(penalty=1.5), [row], logits[b : b + 1])
        np.testing.assert_array_equal(ours[b : b + 1], ref)
    assert ours[0, pad] == logits[0, pad]  # padding not penalised...
    unmasked = np.asarray(process_logits(logits, ids, repetition_penalty=1.5))
    assert unmasked[0, pad] != logits[0, pad]  # ...which the mask is responsible for


def test_seen_tokens_and_mark_seen():
    ids = jnp.array([[1, 1, 3, 9], [0, -1, 2, 4]])  # 9 >= V and -1 are no vocabulary entries: ignored
    mask = jnp.array([[1, 1, 1, 1], [0, 1, 1, 1]])
    seen = seen_tokens(ids, 5, mask)
    expected = np.array([[0, 1, 0, 1, 0], [0, 0, 1, 0, 1]], bool)
    np.testing.assert_array_equal(seen, expected)
    np.testing.assert_array_equal(seen_tokens(ids[:, :0], 5), np.zeros((2, 5), bool))
    marked = mark_seen(seen, jnp.array([0, 5]))  # 5 is out of range: ignored
    expected[0, 0] = True
    np.testing.assert_array_equal(marked, expected)
    np.testing.assert_array_equal(jax.jit(mark_seen)(seen, jnp.array([0, 5])), expected)


# ---------------------------------------------------------------------------------------------------------
# 2. validation: transformers' messages


@pytest.mark.parametrize(
    ("kwargs", "hf_factory"),
    [
        (dict(repetition_penalty=0.0), lambda: RepetitionPenaltyLogitsProcessor(penalty=0.0)),
        (dict(repetition_penalty=-1.0), lambda: RepetitionPenaltyLogitsProcessor(penalty=-1.0)),
        (dict(temperature=0.0), lambda: TemperatureLogitsWarper(0.0)),
        (dict(temperature=-0.5), lambda: TemperatureLogitsWarper(-0.5)),
        (dict(top_k=-1), lambda: TopKLogitsWarper(-1)),
        (dict(top_p=1.5), lambda: TopPLogitsWarper(1.5)),
        (dict(top_p=-0.1), lambda: TopPLogitsWarper(-0.1)),
        (dict(min_tokens_to_keep=0), lambda: TopPLogitsWarper(0.5, min_tokens_to_keep=0)),
    ],
)
def test_values_transformers_refuses_are_refused_naming_the_argument(kwargs, hf_factory):
    with pytest.raises(ValueError):
        hf_factory()
    (name, value), = kwargs.items()
    for call in (lambda **kw: SamplingConfig(do_sample=True, **kw), process_logits, sample):
        args = () if call not in (process_logits, sample) else (np.zeros((1, 4), np.float32), [[0]])
        with pytest.raises(ValueError, match=name) as info:
            call(*args, **kwargs)
        assert repr(value) in str(info.value) or f"{value:g}" in str(info.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("repetition_penalty", True),
        ("temperature", "hot"),
        ("top_k", 2.5),
        ("top_k", False),
        ("top_p", None),
        ("min_tokens_to_keep", 1.0),
        ("do_sample", 1),
    ],
)
def test_non_numbers_and_bools_are_rejected_by_name(name, value):
    with pytest.raises(TypeError, match=name):
        SamplingConfig(**{"do_sample": True, name: value})


def test_valid_values_and_hashability():
    # Ints where floats are wanted, top_k=0 as "off", and a temperature that greedy decoding ignores.
    config = SamplingConfig(do_sample=True, repetition_penalty=1, temperature=2, top_k=0, top_p=1, min_tokens_to_keep=3)
    same = SamplingConfig(True, 1.0, 2.0, 0, 1.0, 3)
    assert config == same and hash(config) == hash(same)
    assert isinstance(config.temperature, float)
    SamplingConfig(do_sample=False, temperature=0.0)
    SamplingConfig(do_sample=True, top_p=0.0)  # HF accepts 0: only the most likely token(s) remain
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=math.nan)


# ---------------------------------------------------------------------------------------------------------
# 3. seeds and keys


def test_same_seed_same_tokens_and_different_seeds_differ():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((64, 50)).astype(np.float32)
    first = sample(logits, seed=7, step=3, temperature=1.2)
    np.testing.assert_array_equal(first, sample(logits, seed=7, step=3, temperature=1.2))
    assert first.dtype == jnp.int32 and first.shape == (64,)
    assert (first != sample(logits, seed=8, step=3, temperature=1.2)).sum() > 32
    assert (first != sample(logits, seed=7, step=4, temperature=1.2)).sum() > 32
    # The key belongs to the seed, not to the row: identical rows with one seed draw the same token, and
    # per-row seeds give independent draws.
    same_rows = np.tile(logits[:1], (64, 1))
    assert len(np.unique(sample(same_rows, seed=7))) == 1
    assert len(np.unique(sample(same_rows, seed=list(range(64))))) > 10


def test_seeds_are_64_bit_and_match_jax_keys_below_2_32():
    for seed in (0, 5, 2**31 + 5, 2**32 - 1):
        np.testing.assert_array_equal(seed_key_data(seed), jax.random.key_data(jax.random.key(seed)))
    logits = np.random.default_rng(9).standard_normal((1, 1000)).astype(np.float32)
    draws = {int(sample(logits, seed=s, temperature=2.0)[0]) for s in (0, 2**32, 2**63, 2**64 - 1)}
    assert len(draws) == 4  # 2**32 is not 0 again: all 64 bits count
    for bad in (-1, 2**64):
        with pytest.raises(ValueError, match="seed"):
            seed_key_data(bad)


def test_key_derivation_is_documented_fold_in_chain():
    logits = np.random.default_rng(3).standard_normal((3, 40)).astype(np.float32)
    seeds = [11, 2**40 + 3, 11]
    tokens = sample(logits, seed=seeds, step=5, top_k=10)
    processed = process_logits(logits, None, top_k=10)
    for b, seed in enumerate(seeds):
        key = jax.random.fold_in(jax.random.wrap_key_data(seed_key_data(seed)), 5)
        assert int(tokens[b]) == int(jax.random.categorical(key, processed[b]))
        np.testing.assert_array_equal(jax.random.key_data(step_keys(jnp.asarray([seed_key_data(seed)]), 5))[0],
                                      jax.random.key_data(key))


def test_row_tokens_do_not_depend_on_the_rest_of_the_batch():
    rng = np.random.default_rng(4)
    vocab = 30
    logits = rng.standard_normal((4, vocab)).astype(np.float32)
    ids = rng.integers(0, vocab, size=(4, 6))
    configs = [SamplingConfig(do_sample=True, repetition_penalty=1.3, temperature=0.9, top_k=12, top_p=0.9),
               SamplingConfig(do_sample=False, repetition_penalty=1.1),
               SamplingConfig(do_sample=True, temperature=1.7),
               SamplingConfig(do_sample=True, top_k=3, top_p=0.5, min_tokens_to_keep=2)]
    key_data = np.stack([seed_key_data(s) for s in (5, 6, 7, 8)])
    step = jnp.int32(17)
    step_fn = jax.jit(next_tokens)
    batch = step_fn(logits, seen_tokens(ids, vocab), SamplingParams.from_configs(configs), key_data, step)
    for r in range(4):
        alone = step_fn(logits[r:r + 1], seen_tokens(ids[r:r + 1], vocab), SamplingParams.from_configs([configs[r]]),
                        key_data[r:r + 1], step)
        assert int(alone[0]) == int(batch[r])
    perm = np.array([3, 1, 0, 2])
    shuffled = step_fn(logits[perm], seen_tokens(ids[perm], vocab),
                       SamplingParams.from_configs([configs[i] for i in perm]), key_data[perm], step)
    np.testing.assert_array_equal(shuffled, np.asarray(batch)[perm])
    # The wrapper agrees with next_tokens.
    single = sample(
        logits[0], ids[0], seed=5, step=17, repetition_penalty=1.3, temperature=0.9, top_k=12, top_p=0.9
    )
    assert single.shape == () and int(single) == int(batch[0])


def _random_case(rng, vocab):
    scale = float(rng.choice([0.1, 1.0, 6.0]))
    logits = (rng.standard_normal((3, vocab)) * scale).astype(np.float32)
    if rng.random() < 0.3:
        logits = np.round(logits)  # ties, also across the candidate boundary
    configs = [SamplingConfig(do_sample=True, top_k=int(rng.choice([0, 1, 3, 20, 100])),
                              top_p=float(rng.choice([1.0, 0.95, 0.9, 0.5, 0.0])),
                              min_tokens_to_keep=int(rng.choice([1, 2]))) for _ in range(3)]
    return logits, SamplingParams.from_configs(configs)


def test_candidate_path_equals_full_sort_whenever_it_claims_exactness():
    """The no-sort path (top candidates only) keeps exactly the full sort's tokens, or defers to it."""
    rng = np.random.default_rng(12)
    exact_rows = fallback_rows = 0
    for _ in range(150):
        logits, params = _random_case(rng, int(rng.choice([50, 300, 2000])))
        candidates = int(rng.choice([4, 16, 64]))
        keep, exact = _keep_candidates(jnp.asarray(logits), params, candidates)
        full = np.asarray(_keep_sorted(jnp.asarray(logits), params))
        exact = np.asarray(exact)
        np.testing.assert_array_equal(np.asarray(keep)[exact], full[exact])
        exact_rows += exact.sum()
        fallback_rows += (~exact).sum()
    assert exact_rows > 200 and fallback_rows > 50  # both paths were exercised


def test_tokens_do_not_depend_on_the_path_taken():
    """A batch forced onto the full sort by another row draws the same tokens for the rows that did not need it."""
    rng = np.random.default_rng(13)
    vocab = 3000
    logits = rng.standard_normal((2, vocab)).astype(np.float32) * 4
    flat = np.zeros((1, vocab), np.float32)  # top_p 0.99 over a flat row: a nucleus far wider than the candidates
    ids = np.zeros((3, 0), np.int32)
    configs = [SamplingConfig(do_sample=True, top_k=40, top_p=0.9), SamplingConfig(do_sample=True, top_p=0.5),
               SamplingConfig(do_sample=True, top_p=0.99)]
    key_data = np.stack([seed_key_data(s) for s in (1, 2, 3)])
    both = np.concatenate([logits, flat])
    params = SamplingParams.from_configs(configs)
    _, exact = _keep_candidates(jnp.asarray(both), params, 64)
    assert np.asarray(exact).tolist() == [True, True, False]
    step_fn = jax.jit(next_tokens, static_argnames="candidates")
    for step, candidates in itertools.product(range(10), [(64,), (8, 64)]):  # one candidate level, or two
        batch = step_fn(both, seen_tokens(ids, vocab), params, key_data, jnp.int32(step), candidates=candidates)
        alone = step_fn(logits, seen_tokens(ids[:2], vocab), SamplingParams.from_configs(configs[:2]), key_data[:2],
                        jnp.int32(step), candidates=candidates)
        np.testing.assert_array_equal(np.asarray(batch)[:2], alone)


# ---------------------------------------------------------------------------------------------------------
# 4. the sampled frequencies follow the processed distribution

# 0.999 quantiles of the chi-square distribution by degrees of freedom (standard tables; equal to
# scipy.stats.chi2.ppf(0.999, df) rounded to 4 decimals).
CHI2_999 = {1: 10.8276, 2: 13.8155, 3: 16.2662, 4: 18.4668, 5: 20.5150, 6: 22.4577, 7: 24.3219}


@pytest.mark.parametrize(
    ("config", "kept"),
    [
        # top-k drops ids 4 and 6, top-p then drops id 3.
        (SamplingConfig(do_sample=True, repetition_penalty=1.3, temperature=0.8, top_k=6, top_p=0.9), 5),
        (SamplingConfig(do_sample=True, temperature=1.7), 8),
    ],
)
def test_sample_frequencies_chi_square(config, kept):
    n = 20_000
    logits = jnp.array([[2.0, 1.5, 1.4, 0.3, -0.2, 1.0, -1.0, 0.8]])
    ids = [[1, 4, 1]]
    seen = seen_tokens(jnp.array(ids), 8)
    processed = process_logits(
        logits, ids, repetition_penalty=config.repetition_penalty, temperature=config.temperature,
        top_k=config.top_k, top_p=config.top_p,
    )[0]
    probs = np.asarray(jax.nn.softmax(processed), np.float64)
    assert int((probs > 0).sum()) == kept
    params = SamplingParams.from_configs([config])
    draw = jax.jit(jax.vmap(lambda t: next_tokens(logits, seen, params, seed_key_data(0)[None], t)[0]))
    counts = np.bincount(np.asarray(draw(jnp.arange(n))), minlength=8)
    assert counts[probs == 0].sum() == 0  # removed tokens never appear
    expected = n * probs[probs > 0]
    chi2 = float(((counts[probs > 0] - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_999[kept - 1], (chi2, counts, expected)


# ---------------------------------------------------------------------------------------------------------
# 5. greedy


def test_greedy_is_argmax_after_repetition_penalty():
    rng = np.random.default_rng(6)
    vocab = 40
    logits = rng.integers(-3, 4, size=(6, vocab)).astype(np.float32)  # many ties: first index wins in both
    logits[1] = rng.standard_normal(vocab) * 3
    ids = rng.integers(0, vocab, size=(6, 10))
    ref = RepetitionPenaltyLogitsProcessor(1.4)(torch.as_tensor(ids), torch.as_tensor(logits).clone()).argmax(-1)
    # Temperature and the filters are ignored when greedy, as in HF (temperature=0 is even allowed).
    config = SamplingConfig(do_sample=False, repetition_penalty=1.4, temperature=0.0, top_k=1, top_p=0.1)
    ours = jax.jit(next_tokens)(
        logits, seen_tokens(ids, vocab), SamplingParams.from_configs([config] * 6),
        np.stack([seed_key_data(0)] * 6), jnp.int32(0)
    )
    np.testing.assert_array_equal(ours, ref.numpy())
    assert ours.dtype == jnp.int32
    # The penalty must matter for this input, or the comparison would prove little.
    assert not np.array_equal(ref.numpy(), logits.argmax(-1))
    np.testing.assert_array_equal(sample(logits, ids, do_sample=False, repetition_penalty=1.4), ref.numpy())


@pytest.mark.parametrize("logit_scale, temperature", [(3e4, 0.05), (10.0, 1e-6)])
def test_top_p_keeps_enough_mass_at_extreme_scales(logit_scale, temperature):
    """|logits / temperature| of ~6e5 and ~1e7: the kept set is transformers' own up to the order of tied scores,
    and never holds less than top_p of the mass by float64 (with probabilities from a float32 logsumexp, 33 and 56
    of these 240 rows did)."""
    rng = np.random.default_rng(22)
    for _ in range(60):
        top_p = float(rng.choice([0.3, 0.5, 0.7, 0.9]))
        # Scores spread over a few units after temperature, so that the nucleus holds several tokens.
        logits = (logit_scale + rng.standard_normal((4, 300)) * 3 * temperature).astype(np.float32)
        ours = np.asarray(process_logits(logits, None, temperature=temperature, top_p=top_p))
        theirs = hf_run(hf_processors(temperature=temperature, top_p=top_p), None, logits)
        scores = (torch.tensor(logits) / temperature).double().numpy()  # transformers' scores, in float64
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        for b in range(logits.shape[0]):
            assert probs[b][np.isfinite(ours[b])].sum() >= top_p, (top_p, b)
            # The same kept scores; which of several tied scores top-p keeps is torch's unstable sort's choice.
            np.testing.assert_array_equal(np.sort(ours[b]), np.sort(theirs[b]))
