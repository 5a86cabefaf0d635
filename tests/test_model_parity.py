"""hdex_jax's forward pass and greedy generation against transformers (PyTorch, float32) on tiny random models."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import converters
import hdex_jax.jitting
from hdex_jax.generation import generate_tokens, place, prepare_batch
from hdex_jax.kv_cache import init_cache
from hdex_jax.jitting import decode_step, prefill
from hdex_jax.params import runtime_layout, unflatten
from hdex_jax.sampling import SamplingConfig
from tests.helpers_tiny import save_tiny_model

FAMILIES = ["llama", "llama3", "mistral", "qwen2", "opt", "opt350m"]
DECODE_STEPS = 16
ATOL = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    """(family, transformers model, hdex config, hdex params) of one tiny random model saved to disk."""
    directory = save_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    reference = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    cfg, flat = converters.load_checkpoint(directory)
    params = runtime_layout(unflatten({k: jnp.asarray(v) for k, v in flat.items()}), num_device=1)
    return request.param, reference, cfg, params, flat


def _left_pad(prompts, pad_id=0):
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


def _prompts(vocab, lengths, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=n).tolist() for n in lengths]


@pytest.mark.parametrize("lengths", [[7], [5, 11, 2]], ids=["single", "batch3-left-padded"])
def test_logits_match_at_prefill_and_each_decode_step(tiny, lengths):
    """The raw logits transformers' own cached greedy decode produces (its public `generate(output_logits=True)`,
    so no cache argument of `forward`, whose name changes across releases), against prefill and each decode step
    fed the tokens transformers chose."""
    family, reference, cfg, params, _ = tiny
    ids, mask = _left_pad(_prompts(cfg.vocab_size, lengths, seed=len(lengths)))
    with torch.no_grad():
        out = reference.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                 max_new_tokens=DECODE_STEPS + 1, min_new_tokens=DECODE_STEPS + 1, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
    chosen = out.sequences[:, ids.shape[1]:].numpy()  # [B, DECODE_STEPS + 1]
    cache = init_cache(cfg, len(lengths), 64)
    ours, cache = prefill(params, cache, jnp.asarray(ids), jnp.asarray(mask), cfg)
    np.testing.assert_allclose(np.asarray(ours), out.logits[0].numpy(), atol=ATOL, rtol=0, err_msg=f"{family} prefill")
    for step in range(DECODE_STEPS):
        ours, cache = decode_step(params, cache, jnp.asarray(chosen[:, step], jnp.int32), cfg)
        np.testing.assert_allclose(np.asarray(ours), out.logits[step + 1].numpy(), atol=ATOL, rtol=0,
                                   err_msg=f"{family} decode step {step}")


@pytest.mark.parametrize("lengths", [[7], [5, 11, 2]], ids=["single", "batch3-left-padded"])
def test_greedy_tokens_identical(tiny, lengths):
    family, reference, cfg, _, flat = tiny
    prompts = _prompts(cfg.vocab_size, lengths, seed=10 + len(lengths))
    batch = prepare_batch(prompts, max_length=64, max_new_tokens=DECODE_STEPS, stop=[], pad_id=0, seed=0,
                          sampling=SamplingConfig(do_sample=False))
    ours = generate_tokens(place(cfg, flat, 1), batch)
    ids, mask = _left_pad(prompts)
    with torch.no_grad():
        expected = reference.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                      max_new_tokens=DECODE_STEPS, min_new_tokens=DECODE_STEPS, pad_token_id=0)
    assert ours == expected[:, ids.shape[1]:].tolist(), family


def test_greedy_tokens_identical_with_the_long_prompt_options(tiny, monkeypatch):
    """Prompt buckets from `jitting.YNN_PROMPT_TOKENS` on compile with YNNPACK's fusions (`jitting.compiler_options`):
    the same tokens as transformers (the threshold lowered so that a tiny prompt reaches it)."""
    family, reference, cfg, _, flat = tiny
    monkeypatch.setattr(hdex_jax.jitting, "YNN_PROMPT_TOKENS", 16)
    prompts = _prompts(cfg.vocab_size, [13], seed=20)
    batch = prepare_batch(prompts, max_length=64, max_new_tokens=DECODE_STEPS, stop=[], pad_id=0, seed=0,
                          sampling=SamplingConfig(do_sample=False))
    assert hdex_jax.jitting.compiler_options(batch.plan.prompt_bucket) == hdex_jax.jitting.PROMPT_PASS_OPTIONS
    ours = generate_tokens(place(cfg, flat, 1), batch)
    with torch.no_grad():  # transformers stops at its eos (included); ours runs on: the same tokens up to there
        expected = reference.generate(torch.tensor(prompts), do_sample=False, max_new_tokens=DECODE_STEPS,
                                      pad_token_id=0)[0, len(prompts[0]):].tolist()
    assert ours[0][:len(expected)] == expected, family
