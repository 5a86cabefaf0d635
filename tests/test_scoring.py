"""Scoring: `model(input_ids).logits` at every position against transformers' forward on tiny families (left and
right padding, chunks through the cache, several devices, the hybrid split), log-likelihoods against log-softmax
of transformers' logits, and no compilation for a new length within a bucket."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import converters
from hdex_jax import forward, scoring
from hdex_jax.generation import place
from hdex_jax.kv_cache import init_cache
from hdex_jax.transformers.modeling import LPUModelForCausalLM
from tests.compilations import counting_compilations
from tests.family_parity import save_random_model
from tests.helpers_tiny import FAMILIES, tiny_hf_config

ATOL = 1e-4
MAX_LENGTH = 64
# Alibi families besides the tiny ones, with their own mechanism in attention (the bias over the keys).
EXTRA_CONFIGS = {"bloom": lambda: transformers.BloomConfig(hidden_size=80, n_layer=2, n_head=5, vocab_size=128,
                                                           bos_token_id=1, eos_token_id=2)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (transformers model, converted (cfg, flat)) of a tiny random checkpoint, made once per module."""
    made = {}

    def get(name):
        if name not in made:
            config = EXTRA_CONFIGS[name]() if name in EXTRA_CONFIGS else tiny_hf_config(name)
            directory = save_random_model(config, tmp_path_factory.mktemp(name))
            reference = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
            made[name] = reference, converters.load_checkpoint(directory)
        return made[name]

    return get


def lpu_model(checkpoint, num_device=1, gpu=0):
    """The converted checkpoint as the user-facing model on `num_device` devices (and a prefill mesh of `gpu`)."""
    cfg, flat = checkpoint
    decode = place(cfg, flat, num_device)
    prefill = place(cfg, flat, gpu, num_device) if gpu else None
    return LPUModelForCausalLM(decode, None, MAX_LENGTH, "tiny", prefill)


def padded_batch(vocab, lengths, width, seed=0):
    """Rows of `lengths` tokens in [width] columns, row 0 left-padded and the others right-padded."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        cols = slice(width - n, width) if i == 0 else slice(0, n)
        ids[i, cols] = rng.integers(3, vocab, size=n)
        mask[i, cols] = 1
    return ids, mask


def reference_logits(reference, ids, mask):
    with torch.no_grad():
        return reference(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()


@pytest.mark.parametrize("name", [*FAMILIES, *EXTRA_CONFIGS])
def test_logits_of_every_position_match_transformers(checkpoints, name):
    reference, checkpoint = checkpoints(name)
    ids, mask = padded_batch(reference.config.vocab_size, (11, 7, 12), 12)
    ours = lpu_model(checkpoint)(ids, attention_mask=mask).logits
    assert isinstance(ours, np.ndarray) and ours.dtype == np.float32 and ours.shape == (3, 12, 128)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], reference_logits(reference, ids, mask)[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["mistral", "bloom"])
def test_long_rows_run_in_chunks_through_the_cache(checkpoints, name, monkeypatch):
    """Chunks of 16 tokens over a 40-token row: mistral's sliding window (32) and bloom's ALiBi span chunks."""
    reference, checkpoint = checkpoints(name)
    monkeypatch.setattr(scoring, "CHUNK_TOKENS", 16)
    ids, mask = padded_batch(reference.config.vocab_size, (40, 33), 40, seed=1)
    ours = lpu_model(checkpoint, num_device=2).forward(ids, mask).logits
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], reference_logits(reference, ids, mask)[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["mistral", "bloom"])
def test_prompt_pass_runs_in_blocks_through_the_cache(checkpoints, name, monkeypatch):
    """A prefill in blocks of 16 tokens over a 40-token left-padded batch: the last logits are transformers'
    (mistral's sliding window and bloom's ALiBi span blocks; each block scores only the slots before it)."""
    reference, (cfg, flat) = checkpoints(name)
    monkeypatch.setattr(forward, "PROMPT_BLOCK", 16)
    rng = np.random.default_rng(3)
    ids, mask = np.zeros((2, 40), np.int64), np.zeros((2, 40), np.int64)
    for row, length in enumerate((40, 27)):
        ids[row, 40 - length:], mask[row, 40 - length:] = rng.integers(3, cfg.vocab_size, size=length), 1
    placement = place(cfg, flat, 2)
    prefill = jax.jit(forward.prefill_fn, static_argnames=("cfg", "mesh"))  # traced afresh, with the patched block
    logits, _ = prefill(placement.params, init_cache(placement.cfg, 2, MAX_LENGTH), jnp.asarray(ids, jnp.int32),
                        jnp.asarray(mask, jnp.int32), placement.cfg, placement.mesh)
    np.testing.assert_allclose(np.asarray(logits), reference_logits(reference, ids, mask)[:, -1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("layout", [{"num_device": 3}, {"num_device": 2, "gpu": 1}])
def test_several_devices_and_the_hybrid_split_give_the_same_logits(checkpoints, layout):
    reference, checkpoint = checkpoints("llama")  # the layout is shared by every family
    ids, mask = padded_batch(reference.config.vocab_size, (9, 5), 9, seed=2)
    ours = lpu_model(checkpoint, **layout)(jax.numpy.asarray(ids), attention_mask=mask).logits
    assert isinstance(ours, jax.Array)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[real], reference_logits(reference, ids, mask)[real], atol=ATOL,
                               rtol=0)


def test_scoring_within_a_bucket_compiles_nothing(checkpoints):
    model = lpu_model(checkpoints("llama")[1])
    rng = np.random.default_rng(3)
    # One length of each bucket the block uses: 2 rows of 32 tokens (logits), 1 row of 16 and of 32 (targets).
    model([rng.integers(3, 128, size=20).tolist()] * 2)
    model.loglikelihood([[5, 6]], [[7]])
    model.loglikelihood_rolling(rng.integers(3, 128, size=20).tolist())
    with counting_compilations() as compiled:
        lists = model([rng.integers(3, 128, size=n).tolist() for n in (17, 31)]).logits
        model.loglikelihood([rng.integers(3, 128, size=9).tolist()], [[4, 5, 6]])
        model.loglikelihood_rolling(rng.integers(3, 128, size=25).tolist())
    assert compiled == []
    assert [x.shape for x in lists] == [(17, 128), (31, 128)]


def test_loglikelihoods_are_sums_of_transformers_log_probs(checkpoints):
    reference, checkpoint = checkpoints("qwen2")
    model = lpu_model(checkpoint)
    rng = np.random.default_rng(4)
    contexts = [rng.integers(3, 128, size=n).tolist() for n in (6, 13, 1)]
    continuations = [rng.integers(3, 128, size=n).tolist() for n in (3, 1, 5)]
    results = model.loglikelihood(contexts, continuations, batch_size=2)
    text = rng.integers(3, 128, size=50).tolist()
    rolling = model.loglikelihood_rolling(text, window=20, stride=8)

    def log_probs(ids):  # [T - 1] log-prob of each token given the ones before it
        with torch.no_grad():
            logits = reference(torch.tensor([ids])).logits[0].double()
        return torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy(), \
            logits[:-1].argmax(-1).numpy()

    for (total, greedy), context, continuation in zip(results, contexts, continuations):
        lp, argmax = log_probs(context + continuation)
        n = len(continuation)
        assert total == pytest.approx(lp[-n:].sum(), abs=ATOL)
        assert greedy == bool(np.all(argmax[-n:] == continuation))
    # Window 20, stride 8: token j (of bos + text) is predicted from at most 20 tokens ending just before it, the
    # window's first new token having 12 tokens of context.
    sequence = [model.prefix_token_id, *text]
    expected = 0.0
    for start in range(1, len(sequence), 8):
        end = min(start + 8, len(sequence))
        inputs = sequence[max(0, end - 21):end]
        expected += log_probs(inputs)[0][-(end - start):].sum()
    assert rolling == pytest.approx(expected, abs=ATOL)
    assert model.loglikelihood(contexts[0], continuations[0]) == pytest.approx(results[0], abs=1e-6)


def test_bad_scoring_inputs_name_the_argument(checkpoints):
    model = lpu_model(checkpoints("llama")[1])
    with pytest.raises(ValueError, match="input_ids.*2-D"):
        model(np.zeros(5, np.int64))
    with pytest.raises(ValueError, match="attention_mask"):
        model(np.zeros((1, 5), np.int64), attention_mask=np.ones((1, 4)))
    with pytest.raises(ValueError, match="max_length"):
        model([[3] * (MAX_LENGTH + 1)])
    with pytest.raises(ValueError, match="stride"):
        model.loglikelihood_rolling([3, 4, 5], window=8, stride=9)
    with pytest.raises(ValueError, match="context has 2 entries"):
        model.loglikelihood([[3], [4]], [[5]])
