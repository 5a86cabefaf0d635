"""BLOOM, MPT and Falcon: parity of tiny random checkpoints with transformers on 1, 3 and 4 devices, Falcon's
three fused q/k/v layouts against transformers' logits at every position, the ALiBi slopes against transformers' own, and the
options the converters refuse.

The tiny sizes make 3 and 4 devices pad heads: 5 heads (BLOOM, MPT, falcon-rw; also a non-power-of-two head
count for the ALiBi slopes) and Falcon's grouped 4 heads / 2 KV heads. Falcon-7B's multi-query layout is
checked at the converter level only: the rest of what it exercises (one KV head, a parallel block sharing its
norm, RoPE) is the same forward code as the grouped variant's and other families' parity tests, and a fifth
generation run would cost about 45 s of CPU.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from converters import CheckpointError, config_from_hf, load_checkpoint
from converters.families.bloom import bloom_alibi_slopes
from converters.families.falcon import falcon_alibi_slopes
from converters.families.mpt import mpt_alibi_slopes
from hdex_jax.generation import place
from hdex_jax.scoring import score
from tests.family_parity import Reference, save_random_model

_IDS = {"vocab_size": 128, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}

CONFIGS = {
    # 5 heads: the slopes of a non-power-of-two head count, and padding on 3 and 4 devices.
    "bloom": lambda: transformers.BloomConfig(hidden_size=80, n_layer=2, n_head=5, **_IDS),
    # softmax_scale other than 1/sqrt(head_dim) checks that it becomes the attention scale.
    "mpt": lambda: transformers.MptConfig(d_model=80, n_heads=5, n_layers=2, max_seq_len=128,
                                          attn_config={"softmax_scale": 0.3}, **_IDS),
    # falcon-rw: ALiBi, per-head interleaved q/k/v, sequential block, biases.
    "falcon_rw": lambda: transformers.FalconConfig(hidden_size=80, num_hidden_layers=2, num_attention_heads=5,
                                                   alibi=True, multi_query=False, parallel_attn=False, bias=True,
                                                   ffn_hidden_size=96, max_position_embeddings=128, **_IDS),
    # falcon-7b: multi-query, parallel block sharing one norm, RoPE, no biases.
    "falcon_mqa": lambda: transformers.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                    multi_query=True, parallel_attn=True, ffn_hidden_size=96,
                                                    max_position_embeddings=128, **_IDS),
    # falcon-40b: grouped q/k/v, parallel block with two norms, biases (on the grouped bias too).
    "falcon_grouped": lambda: transformers.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                        num_kv_heads=2, new_decoder_architecture=True, bias=True,
                                                        ffn_hidden_size=96, max_position_embeddings=128,
                                                        rope_parameters={"rope_type": "default",
                                                                         "rope_theta": 500.0}, **_IDS),
}


PARITY = ("bloom", "falcon_grouped", "falcon_rw", "mpt")


@pytest.fixture(scope="module", params=PARITY)
def reference(request, tmp_path_factory) -> Reference:
    directory = save_random_model(CONFIGS[request.param](), tmp_path_factory.mktemp(request.param))
    return Reference.of(directory)


@pytest.mark.parametrize("num_device", [1, 3, 4])
def test_parity(reference: Reference, num_device: int):
    reference.check(num_device)


@pytest.mark.parametrize("name", ["falcon_rw", "falcon_mqa", "falcon_grouped"])
def test_falcon_qkv_layouts_match_transformers(name: str, tmp_path):
    """Each fused q/k/v layout, converted, gives transformers' logits at every position of a forward pass (its
    public output: the split itself is a private method that releases rename)."""
    directory = save_random_model(CONFIGS[name](), tmp_path)
    cfg, flat = load_checkpoint(directory)
    ids = np.array([[3, 17, 40, 5, 99], [9, 9, 101, 64, 2]])
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(torch.tensor(ids)).logits.numpy()
    ours = score(place(cfg, flat, 1), ids, np.ones_like(ids))
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0, err_msg=name)


# ------------------------------------------------------------------------------------------- ALiBi slopes

KEYS = 32


def _slopes_of(config: transformers.PretrainedConfig) -> np.ndarray:
    """The ALiBi slopes transformers' model applies, read off its attention probabilities: with every weight zero the
    scores are the bias alone, so the last query's log-probability rises by the head's slope per key position (a
    least-squares line over the keys, within 3e-7 of the float32 slopes)."""
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").double().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        out = model(torch.zeros(1, KEYS, dtype=torch.long), output_attentions=True)
    log_probs = out.attentions[0][0, :, -1].log().numpy()  # [heads, keys]
    return np.polyfit(np.arange(KEYS), log_probs.T, 1)[0]


HEAD_COUNTS = (1, 2, 3, 5, 8, 12, 16, 20, 32, 33, 48, 64, 71)


def test_bloom_slopes_match_transformers():
    for heads in HEAD_COUNTS:
        expected = _slopes_of(transformers.BloomConfig(vocab_size=8, hidden_size=2 * heads, n_layer=1, n_head=heads))
        assert bloom_alibi_slopes(heads) == pytest.approx(expected, rel=1e-6), heads


def test_mpt_slopes_match_transformers():
    for heads in HEAD_COUNTS:
        expected = _slopes_of(transformers.MptConfig(vocab_size=8, d_model=2 * heads, n_heads=heads, n_layers=1,
                                                     max_seq_len=KEYS))
        assert mpt_alibi_slopes(heads) == pytest.approx(expected, rel=1e-6), heads


def test_falcon_slopes_match_transformers():
    """falcon-rw's slopes are BLOOM's, rounded to bfloat16, per sqrt(head_dim): read BLOOM's off its model.
    Falcon's own attention probabilities are no reference: transformers 5.18's eager ALiBi path adds the bias twice
    (once in the scores, once in the mask; 5.25 adds it once), while the default sdpa path, which
    test_parity[falcon_rw] checks end to end, adds it once."""
    for heads in (1, 5, 8, 32, 71):
        cfg = config_from_hf({**_FALCON, "hidden_size": heads * 16, "num_attention_heads": heads, "alibi": True})
        bloom = _slopes_of(transformers.BloomConfig(vocab_size=8, hidden_size=2 * heads, n_layer=1, n_head=heads))
        expected = bloom.astype(np.float32).astype(jnp.bfloat16).astype(np.float32) / math.sqrt(cfg.head_dim)
        assert falcon_alibi_slopes(cfg) == pytest.approx(expected, rel=1e-6), heads


# ---------------------------------------------------------------------------------------- refused options

_BLOOM = {"model_type": "bloom", "vocab_size": 8, "hidden_size": 16, "n_layer": 1, "n_head": 2}
_MPT = {"model_type": "mpt", "vocab_size": 8, "d_model": 16, "n_layers": 1, "n_heads": 2}
_FALCON = {"model_type": "falcon", "vocab_size": 8, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}

REFUSED = [
    (_BLOOM, {"apply_residual_connection_post_layernorm": True}, "apply_residual_connection_post_layernorm"),
    (_MPT, {"attn_config": {"clip_qkv": 6.0}}, "attn_config.clip_qkv"),
    (_MPT, {"attn_config": {"qk_ln": True}}, "attn_config.qk_ln"),
    (_MPT, {"attn_config": {"prefix_lm": True}}, "attn_config.prefix_lm"),
    (_MPT, {"attn_config": {"alibi": False}}, "attn_config.alibi"),
    (_MPT, {"attn_config": {"attn_type": "multiquery_attention"}}, "attn_config.attn_type"),
    (_MPT, {"attn_config": {"alibi_bias_max": 16}}, "attn_config.alibi_bias_max"),
    (_MPT, {"no_bias": False}, "no_bias"),
    (_MPT, {"logit_scale": 0.5}, "logit_scale"),
    (_MPT, {"norm_type": "rmsnorm"}, "norm_type"),
    (_FALCON, {"new_decoder_architecture": True, "parallel_attn": False}, "parallel_attn"),
    (_FALCON, {"num_ln_in_parallel_attn": 2}, "num_ln_in_parallel_attn"),
    (_FALCON, {"rope_parameters": {"rope_type": "proportional", "rope_theta": 1e4}}, "proportional"),
    (_FALCON, {"apply_residual_connection_post_layernorm": True}, "apply_residual_connection_post_layernorm"),
]


@pytest.mark.parametrize("base, change, key", REFUSED, ids=[f"{b['model_type']}-{k}" for b, _, k in REFUSED])
def test_refused_option_names_its_key(base, change, key):
    with pytest.raises(CheckpointError, match=key) as info:
        config_from_hf({**base, **change}, "some/config.json")
    assert "some/config.json" in str(info.value)


def test_hub_config_spellings():
    """The bigscience and tiiuae config.json files predate transformers' key names."""
    bloom = config_from_hf({"model_type": "bloom", "vocab_size": 8, "n_embed": 32, "num_attention_heads": 4,
                            "n_layer": 3})
    assert (bloom.hidden_size, bloom.num_heads, bloom.head_dim, bloom.num_layers) == (32, 4, 8, 3)
    falcon_40b = config_from_hf({**_FALCON, "num_attention_heads": 8, "hidden_size": 64, "num_kv_heads": 2,
                                 "new_decoder_architecture": True})
    assert (falcon_40b.num_kv_heads, falcon_40b.parallel_residual, falcon_40b.shared_norm) == (2, True, False)
    falcon_11b = config_from_hf({**_FALCON, "new_decoder_architecture": True, "num_ln_in_parallel_attn": 1})
    assert (falcon_11b.parallel_residual, falcon_11b.shared_norm) == (True, True)
    # Outside the new decoder, num_kv_heads is ignored (as by transformers): multi-query means one KV head.
    falcon_7b = config_from_hf({**_FALCON, "num_kv_heads": 2, "multi_query": True})
    assert falcon_7b.num_kv_heads == 1
