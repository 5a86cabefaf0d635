"""Rope scaling (hdex_jax/rope.py): every kind transformers defines, against transformers' own classes.

- Parity (tests/family_parity.py: greedy tokens and every step's logits within 1e-4, a batch of prompts of 5 and 9
  tokens plus 8 new ones) of one tiny checkpoint per kind, on 1 device, and on 3 for the kinds that depend on the
  sequence length at run time and for llama3. The original length is 12, so the prompt pass is within it and
  decoding passes it at the fourth step: dynamic scaling starts to grow there, in the middle of a jitted decode.
  Longrope's switch from its short to its long factors is run the same way on Llama; on Phi-3 the original length
  is 8, which the prompt pass already exceeds (see `LONGROPE_ORIGINAL`).
- For every family whose transformers class takes rope parameters, and every kind it accepts: the cos/sin tables
  of the converted config equal those of the family's own rotary embedding module, within and past the original
  length (this is what the forward pass multiplies q and k by).
- GGUF forms, written as llama.cpp's convert_hf_to_gguf.py writes them (llama's rope_freqs tensor for llama3
  scaling, qwen2's yarn keys, phi3's longrope tensors), give the tables and params of the Hugging Face conversion
  of the checkpoint they were written from; the llama3 one also generates transformers' tokens and logits.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import converters
from converters.errors import CheckpointError
from hdex_jax import rope
from hdex_jax.config import ModelConfig
from hdex_jax.hub import ModelSource
from hdex_jax.model_store import ModelStore
from tests.family_parity import Reference, save_random_model
from tests.helpers_tiny import llamacpp_permute
from tests.test_gguf_families import Case, _phi3, _text_model, write_gguf

ORIGINAL = 12
# transformers' Phi-3 generate recomputes the whole cache with the long factors when the batch first grows past the
# original length (Phi3ForCausalLM.prepare_inputs_for_generation); hdex_jax keeps the keys it cached with the short
# factors (README, "Rope scaling"), so the parity run starts past the original length, where both use the long
# factors throughout. Within it, the short factors are checked by the tables test below.
LONGROPE_ORIGINAL = 8
_SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_THETA = 10000.0
_rng = np.random.default_rng(0)
# Phi-3's partial rotary factor 0.5 of head_dim 16 rotates 8 features: 4 frequencies.
_SHORT, _LONG = (1 + 0.5 * _rng.random(4)).tolist(), (1 + 7 * _rng.random(4)).tolist()

# The scaling of each kind: each changes the frequencies these short sequences use.
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL, "beta_fast": 8.0,
             "beta_slow": 2.0},
    "yarn-mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
                    "mscale": 0.8, "mscale_all_dim": 0.4},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL},
    "longrope": {"rope_type": "longrope", "short_factor": _SHORT, "long_factor": _LONG,
                 "original_max_position_embeddings": LONGROPE_ORIGINAL},
}
# Positions the model has: dynamic scaling's max_position_embeddings is the original length it grows from;
# the others' is the extended length, factor x the original.
_POSITIONS = {"dynamic": ORIGINAL, "linear": 128}


def _rope_parameters(kind: str, **extra: float) -> dict:
    return {"rope_parameters": {**SCALINGS[kind], "rope_theta": _THETA, **extra}}


def _positions(kind: str) -> int:
    return _POSITIONS.get(kind, 4 * ORIGINAL)


PARITY = {
    "linear": lambda: transformers.MistralConfig(**_SIZES, max_position_embeddings=_positions("linear"),
                                                 sliding_window=None, **_rope_parameters("linear")),
    "dynamic": lambda: transformers.LlamaConfig(**_SIZES, max_position_embeddings=_positions("dynamic"),
                                                **_rope_parameters("dynamic")),
    "yarn": lambda: transformers.Qwen2Config(**_SIZES, max_position_embeddings=_positions("yarn"),
                                             use_sliding_window=False, **_rope_parameters("yarn")),
    # Llama 3.2-shaped: llama3 scaling, tied head, several eos ids.
    "llama3": lambda: transformers.LlamaConfig(**{**_SIZES, "eos_token_id": [2, 3]}, tie_word_embeddings=True,
                                               max_position_embeddings=_positions("llama3"),
                                               **_rope_parameters("llama3")),
    # Longrope switching to the long factors in the middle of decoding (transformers' Llama keeps its cache).
    "longrope-llama": lambda: transformers.LlamaConfig(**_SIZES, max_position_embeddings=_positions("longrope"),
                                                       rope_parameters={**SCALINGS["longrope"], "rope_theta": _THETA,
                                                                        "original_max_position_embeddings": ORIGINAL,
                                                                        "short_factor": _SHORT * 2,
                                                                        "long_factor": _LONG * 2}),
    # Phi-3 128k / Phi-3.5-shaped: longrope with the original length at the top level, partial rotary.
    "longrope": lambda: transformers.Phi3Config(**_SIZES, max_position_embeddings=_positions("longrope"),
                                                original_max_position_embeddings=LONGROPE_ORIGINAL,
                                                partial_rotary_factor=0.5, **_rope_parameters("longrope")),
}


# Each device count compiles the model again; 3 devices for the kinds whose tables are computed at run time, and
# for llama3 (Llama 3.x, the most downloaded case).
_RUNS = [(kind, 1) for kind in sorted(PARITY)] + [(kind, 3) for kind in ("dynamic", "llama3", "longrope")]


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> Callable[[str], Reference]:
    """The Reference of PARITY[kind], made once per kind."""
    made: dict[str, Reference] = {}

    def get(kind: str) -> Reference:
        if kind not in made:
            made[kind] = Reference.of(save_random_model(PARITY[kind](), tmp_path_factory.mktemp(kind)))
        return made[kind]

    return get


@pytest.mark.parametrize("kind, num_device", _RUNS, ids=[f"{k}-{n}" for k, n in _RUNS])
def test_parity(references: Callable[[str], Reference], kind: str, num_device: int) -> None:
    references(kind).check(num_device)


# ------------------------------------------------------------------------ every family's own rotary embedding

# Every family whose transformers config takes rope parameters, and the kinds it accepts (Phi3Config: longrope).
_FAMILIES = ("llama", "mistral", "qwen2", "mixtral", "phi", "stablelm", "starcoder2", "olmo", "gemma", "gemma2",
             "falcon", "gpt_neox")
_FAMILY_KINDS = [(f, k) for f in _FAMILIES for k in SCALINGS if k != "longrope"] + [("phi3", "longrope")]


def _family_config(model_type: str, kind: str) -> transformers.PretrainedConfig:
    extra = {"partial_rotary_factor": 0.5} if model_type in ("phi", "stablelm", "phi3", "gpt_neox") else {}
    fields = dict(_SIZES, max_position_embeddings=_positions(kind), **_rope_parameters(kind, **extra))
    if model_type != "falcon":  # FalconConfig derives it
        # Mixtral's config has head_dim None, which transformers' dynamic, yarn and longrope fail on; Gemma's
        # default is 256.
        fields["head_dim"] = 16
    if model_type == "phi3":
        fields["original_max_position_embeddings"] = LONGROPE_ORIGINAL
    if model_type == "gpt_neox":
        fields["rotary_pct"] = 0.5
    return transformers.AutoConfig.for_model(model_type, **fields)


@pytest.mark.parametrize("model_type, kind", _FAMILY_KINDS, ids=[f"{f}-{k}" for f, k in _FAMILY_KINDS])
def test_tables_equal_the_family_rotary_embedding(model_type: str, kind: str) -> None:
    config = _family_config(model_type, kind)
    cfg = converters.config_from_hf(config.to_dict(), "config.json")
    assert dict(cfg.rope_scaling)["rope_type"] == SCALINGS[kind]["rope_type"]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    original = dict(cfg.rope_scaling).get("original_max_position_embeddings", ORIGINAL)
    for length in (original - 3, 2 * ORIGINAL):  # within and past the original length
        # A fresh module each time: transformers' dynamic scaling keeps state between calls.
        embedding = next(type(m) for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding"))(config)
        positions = torch.arange(length)[None]
        cos, sin = embedding(torch.zeros(1, length, cfg.head_dim), positions)
        ours = rope.tables(jnp.asarray(positions.numpy()), cfg)
        for got, want in zip(ours, (cos, sin)):
            np.testing.assert_allclose(np.asarray(got)[:, :, 0], want.numpy(), rtol=0, atol=2e-6,
                                       err_msg=f"{model_type} {kind} at length {length}")


def test_unknown_kind_is_refused_naming_it() -> None:
    hf = _family_config("llama", "linear").to_dict()
    for family_hf in (hf, {**_family_config("phi3", "longrope").to_dict()}):
        family_hf = {**family_hf, "rope_parameters": {"rope_type": "proportional", "rope_theta": _THETA}}
        with pytest.raises(CheckpointError, match="config.json: rope scaling type 'proportional' is not supported"):
            converters.config_from_hf(family_hf, "config.json")
    with pytest.raises(CheckpointError, match="rope scaling type 'linear' is not supported for model_type 'phi3'"):
        converters.config_from_hf({**_family_config("phi3", "longrope").to_dict(),
                                   "rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "config.json")
    with pytest.raises(ValueError, match="rope scaling type 'ntk' is not supported"):
        dataclasses.replace(converters.config_from_hf(hf, "config.json"), rope_scaling=(("rope_type", "ntk"),))


def test_longrope_factors_of_the_wrong_length_are_refused() -> None:
    hf = _family_config("phi3", "longrope").to_dict()
    hf["rope_parameters"] = {**hf["rope_parameters"], "short_factor": [1.0] * 3}
    with pytest.raises(ValueError, match="short_factor has 3 entries, the rotary dimension 8 needs 4"):
        converters.config_from_hf(hf, "config.json")


def test_hdex_config_json_round_trip_keeps_factor_lists(tmp_path: Path) -> None:
    cfg = converters.config_from_hf(_family_config("phi3", "longrope").to_dict(), "config.json")
    cfg.save(tmp_path)
    loaded = ModelConfig.load(tmp_path)
    assert loaded == cfg and hash(loaded) == hash(cfg)


def test_max_length_past_the_positions_is_kept_for_dynamic_scaling_only(capsys, tmp_path: Path) -> None:
    store = ModelStore(ModelSource("m", tmp_path, None))
    dynamic = converters.config_from_hf(_family_config("llama", "dynamic").to_dict(), "config.json")
    assert store.cap_max_length(4 * ORIGINAL, dynamic) == 4 * ORIGINAL
    yarn = converters.config_from_hf(_family_config("llama", "yarn").to_dict(), "config.json")
    assert store.cap_max_length(8 * ORIGINAL, yarn) == 4 * ORIGINAL
    assert "exceeds the 48 positions" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------ GGUF


def _llama3_rope_freqs(c: transformers.PretrainedConfig) -> np.ndarray:
    """The rope_freqs tensor of LlamaModel.generate_extra_tensors in llama.cpp's convert script (with the
    checkpoint's own original length; the script reads a top-level one, else assumes Llama 3's 8192)."""
    p = c.rope_parameters
    dim = c.head_dim
    freqs = 1.0 / (p["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / p["low_freq_factor"], old_len / p["high_freq_factor"]
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(p["factor"])
        else:
            smooth = (old_len / wavelen - p["low_freq_factor"]) / (p["high_freq_factor"] - p["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / p["factor"] + smooth))
    return np.asarray(factors, np.float32)


def _llama(w: gguf.GGUFWriter, c: transformers.PretrainedConfig) -> None:
    _text_model(w, c)
    w.add_rope_dimension_count(c.head_dim)


def _llama_layout(name: str, x: np.ndarray, c: transformers.PretrainedConfig) -> np.ndarray:
    if name.endswith("q_proj.weight"):
        return llamacpp_permute(x, c.num_attention_heads)
    if name.endswith("k_proj.weight"):
        return llamacpp_permute(x, c.num_key_value_heads)
    return x


def _yarn(w: gguf.GGUFWriter, c: transformers.PretrainedConfig) -> None:
    _text_model(w, c)
    p = c.rope_parameters
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(p["factor"])
    w.add_rope_scaling_orig_ctx_len(p["original_max_position_embeddings"])
    w.add_rope_scaling_yarn_beta_fast(p["beta_fast"])
    w.add_rope_scaling_yarn_beta_slow(p["beta_slow"])


def _longrope(w: gguf.GGUFWriter, c: transformers.PretrainedConfig) -> None:
    _phi3(w, c)
    original = c.rope_parameters["original_max_position_embeddings"]
    w.add_rope_scaling_orig_ctx_len(original)
    scale = c.max_position_embeddings / original
    w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))


GGUF_CASES = {
    "llama3": (Case("llama", PARITY["llama3"], _llama, _llama_layout),
               lambda c: {"rope_freqs.weight": _llama3_rope_freqs(c)}),
    "yarn": (Case("qwen2", PARITY["yarn"], _yarn), lambda c: {}),
    "longrope": (Case("phi3", PARITY["longrope"], _longrope),
                 lambda c: {"rope_factors_long.weight": np.asarray(_LONG, np.float32),
                            "rope_factors_short.weight": np.asarray(_SHORT, np.float32)}),
}


def _write(kind: str, directory: Path) -> tuple[Path, Path]:
    """The HF checkpoint of GGUF case `kind` and the GGUF written from it."""
    case, tensors = GGUF_CASES[kind]
    hf_dir = save_random_model(case.config(), directory / "hf")
    extra = tensors(transformers.AutoConfig.from_pretrained(hf_dir))
    return hf_dir, write_gguf(hf_dir, directory / f"{kind}.gguf", case, extra=extra)


@pytest.mark.parametrize("kind", sorted(GGUF_CASES))
def test_gguf_rope_equals_the_hf_conversion(kind: str, tmp_path: Path) -> None:
    hf_dir, path = _write(kind, tmp_path)
    (gguf_cfg, from_gguf), (hf_cfg, from_hf) = converters.load_checkpoint(path), converters.load_checkpoint(hf_dir)
    positions = jnp.arange(4 * ORIGINAL)[None]
    for got, want in zip(rope.tables(positions, gguf_cfg), rope.tables(positions, hf_cfg)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)
    assert from_gguf.keys() == from_hf.keys()
    for name, value in from_hf.items():
        np.testing.assert_allclose(from_gguf[name], value, rtol=0, atol=1e-6, err_msg=name)


def test_gguf_llama3_generation_matches_transformers(tmp_path: Path) -> None:
    """Llama 3.2-shaped, as a GGUF with llama.cpp's rope_freqs tensor, past the original length."""
    hf_dir, path = _write("llama3", tmp_path)
    dataclasses.replace(Reference.of(hf_dir), directory=path).check(num_device=1)
