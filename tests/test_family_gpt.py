"""GPT-2, GPTBigCode, GPT-J and GPT-NeoX: parity of tiny random checkpoints with transformers on 1, 3 and 4
devices, and the converter details the parity runs do not reach (Hub-style tensor names, refused options)."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import converters
from converters.errors import CheckpointError
from converters.registry import get_converter
from tests.family_parity import Reference, save_random_model

# Tiny sizes: 4 heads, so 3 and 4 devices pad heads; ids 0-2 are pad, bos, eos.
TOKENS = {"vocab_size": 128, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
GPT_SIZES = {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 96, "n_positions": 128, **TOKENS}
NEOX_SIZES = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 96,
              "max_position_embeddings": 128, **TOKENS}

# Each family with its distinctive mechanism switched on: GPT-J and GPT-NeoX rotate only part of each head
# (GPT-J's interleaved pairs are permuted by the converter), GPTBigCode with multi-query attention (its other
# c_attn layout is checked against transformers' attention block below), GPT-NeoX with its parallel residual.
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(**GPT_SIZES),
    "gpt_bigcode": lambda: transformers.GPTBigCodeConfig(multi_query=True, **GPT_SIZES),
    "gptj": lambda: transformers.GPTJConfig(rotary_dim=8, **GPT_SIZES),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(rotary_pct=0.5, use_parallel_residual=True, **NEOX_SIZES),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def reference(request, tmp_path_factory) -> Reference:
    """transformers' greedy generation of a tiny random checkpoint of each family."""
    directory = tmp_path_factory.mktemp(request.param)
    return Reference.of(save_random_model(CONFIGS[request.param](), directory))


@pytest.mark.parametrize("num_device", [1, 3, 4])
def test_parity(reference: Reference, num_device: int) -> None:
    reference.check(num_device)


def test_sequential_neox_parity(tmp_path) -> None:
    """GPT-NeoX with `use_parallel_residual=false`. The sequential block is the forward pass every pre-LN
    family shares (GPT-2 runs it on 1, 3 and 4 devices above), so one device checks this converter's part."""
    config = transformers.GPTNeoXConfig(rotary_pct=0.5, use_parallel_residual=False, **NEOX_SIZES)
    Reference.of(save_random_model(config, tmp_path)).check(1)


def test_per_head_c_attn_matches_transformers(tmp_path) -> None:
    """GPTBigCode's `multi_query=false` c_attn (per-head [q k v], the layout GPT-NeoX shares): the converted
    q/k/v/o reproduce transformers' own attention block on random inputs (no mask, so no positions needed)."""
    config = transformers.GPTBigCodeConfig(multi_query=False, **GPT_SIZES)
    directory = save_random_model(config, tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    cfg, flat = converters.load_checkpoint(directory)
    x = np.random.default_rng(0).standard_normal((1, 6, cfg.hidden_size)).astype(np.float32)
    with torch.no_grad():
        expected = model.transformer.h[0].attn(torch.from_numpy(x))[0][0].numpy()

    p = {name.removeprefix("layers/attn/"): value[0] for name, value in flat.items() if "/attn/" in name}
    q, k, v = (np.einsum("td,dhk->thk", x[0], p[f"{n}/w"]) + p[f"{n}/b"] for n in "qkv")
    scores = np.einsum("thk,shk->hts", q, k) * cfg.head_dim ** -0.5
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("thk,hkd->td", np.einsum("hts,shk->thk", probs, v), p["o/w"]) + p["o/b"]
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


# Tensors the Hub files of each family carry beyond what save_pretrained writes today: GPT-2's were saved from
# GPT2Model (no "transformer." prefix) with the causal-mask buffers, gpt-j-6b has the buffers too, pythia the
# buffers and its rotary frequencies. (GPTBigCode's mask buffer was never persistent.)
def _hub_style(family: str, tensors: dict[str, np.ndarray], num_layers: int) -> dict[str, np.ndarray]:
    mask = np.tril(np.ones((1, 1, 128, 128), np.float32))
    if family == "gpt2":
        tensors = {name.removeprefix("transformer."): value for name, value in tensors.items()}
        tensors["lm_head.weight"] = tensors["wte.weight"]
        for i in range(num_layers):
            tensors[f"h.{i}.attn.bias"], tensors[f"h.{i}.attn.masked_bias"] = mask, np.array(-1e4, np.float32)
    if family == "gptj":
        for i in range(num_layers):
            tensors[f"transformer.h.{i}.attn.bias"] = mask
            tensors[f"transformer.h.{i}.attn.masked_bias"] = np.array(-1e9, np.float32)
    if family == "gpt_neox":
        for i in range(num_layers):
            tensors[f"gpt_neox.layers.{i}.attention.bias"] = mask
            tensors[f"gpt_neox.layers.{i}.attention.masked_bias"] = np.array(-1e9, np.float32)
            tensors[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    return tensors


@pytest.mark.parametrize("family", ["gpt2", "gptj", "gpt_neox"])
def test_hub_tensor_names(family: str, tmp_path) -> None:
    """A checkpoint named and padded with buffers as the Hub files are converts to the same params."""
    directory = save_random_model(CONFIGS[family](), tmp_path / "saved")
    _, expected = converters.load_checkpoint(directory)
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.json").write_text((directory / "config.json").read_text())
    tensors = safetensors.numpy.load_file(directory / "model.safetensors")
    safetensors.numpy.save_file(_hub_style(family, tensors, num_layers=2), hub / "model.safetensors")
    _, flat = converters.load_checkpoint(hub)
    assert flat.keys() == expected.keys()
    for name in flat:
        np.testing.assert_array_equal(flat[name], expected[name], err_msg=name)


@pytest.mark.parametrize("family, change, key", [
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ("gpt2", {"add_cross_attention": True}, "add_cross_attention"),
    ("gptj", {"rotary_dim": 7}, "rotary_dim"),
    ("gpt_neox", {"rope_scaling": {"rope_type": "proportional"}}, "proportional"),
    ("gpt_neox", {"rotary_pct": 0.0625, "rope_parameters": None}, "rotary_pct"),
])
def test_refused_options(family: str, change: dict, key: str) -> None:
    """Options the canonical model does not implement are refused naming the key, not converted wrongly."""
    hf = {**CONFIGS[family]().to_dict(), **change}
    with pytest.raises(CheckpointError, match=key) as error:
        get_converter(hf["model_type"]).config_from_hf(hf, "some/config.json")
    assert "some/config.json" in str(error.value)
