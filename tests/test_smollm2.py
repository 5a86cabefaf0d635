"""The real model: SmolLM2-135M-Instruct from its GGUF, greedy tokens identical to transformers loading the same
GGUF. The GGUF is fetched at most once per test session, into the session's temporary HDEX_HOME (conftest.py),
where the model is compiled once for this module and the quickstart notebook."""

import numpy as np
import pytest
import torch
import transformers

from hdex_jax import hub
from hdex_jax.tools import AutoCompiler
from hdex_jax.transformers import AutoModelForCausalLM

# With the quickstart notebook, which compiles the same model in the same session HDEX_HOME.
pytestmark = pytest.mark.xdist_group("default_model")

NEW_TOKENS = 40
CHATS = ["Write a short story about a robot who learns to paint.",
         "Describe the water cycle in detail.",
         "List five fruits and describe each one."]
TEXTS = ["The history of the Roman Empire", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def gguf():
    return hub.default_model_gguf()


@pytest.fixture(scope="module")
def reference(gguf):
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                              dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def model(gguf):
    """The default model compiled as notebooks/quickstart.ipynb compiles it, in the session's HDEX_HOME: whichever
    of the two runs first compiles it (about a minute and a half) and the other loads it, as a user's second
    process does."""
    AutoCompiler().compile(model_id=hub.DEFAULT_MODEL, num_device=1, max_length=512)
    return AutoModelForCausalLM.from_pretrained(hub.DEFAULT_MODEL, device_map={"lpu": 1})


def _prompts(tokenizer):
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False) for c in CHATS]
    return [list(ids) for ids in chats] + [tokenizer.encode(t) for t in TEXTS]


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.3])
def test_greedy_tokens_match_transformers(model, reference, repetition_penalty):
    for prompt in _prompts(model.tokenizer):
        ours = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False,
                              repetition_penalty=repetition_penalty)
        with torch.no_grad():
            theirs = reference.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS,
                                        repetition_penalty=repetition_penalty)[0].tolist()
        assert ours == theirs, model.tokenizer.decode(prompt)
        assert len(ours) - len(prompt) == NEW_TOKENS, "the prompt should not stop early"


def test_config_read_from_gguf(model):
    cfg = model.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3,
                                                                                                  49152)
    assert cfg.tie_embeddings and cfg.eos_token_ids == (2,)


def test_first_step_scores_match_transformers(model, reference):
    """output_scores on the real model: the first step's processed scores within 2e-3 of transformers'."""
    prompt = _prompts(model.tokenizer)[0]
    kwargs = dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.2)
    ours = model.generate(prompt, max_new_tokens=1, seed=0, return_dict_in_generate=True, output_scores=True,
                          **kwargs).scores[0][0]
    with torch.no_grad():
        theirs = reference.generate(torch.tensor([prompt]), max_new_tokens=1, return_dict_in_generate=True,
                                    output_scores=True, **kwargs).scores[0][0].numpy()
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
    finite = np.isfinite(theirs)
    assert 1 < finite.sum() <= 50
    np.testing.assert_allclose(ours[finite], theirs[finite], atol=2e-3, rtol=0)


def test_logits_of_every_position_match_transformers(model, reference):
    """model(ids).logits on the real model: every position of two rows (one left-padded) within 1e-4."""
    rows = [model.tokenizer.encode(t) for t in ("The history of the Roman Empire begins with the founding of "
                                                "the city of Rome, which legend dates to 753 BC.", TEXTS[1])]
    width = max(map(len, rows))
    ids = np.zeros((2, width), np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    ours = model(ids, attention_mask=mask).logits
    with torch.no_grad():
        theirs = reference(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)
