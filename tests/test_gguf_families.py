"""GGUF files of every architecture a family declares (its `FAMILY.gguf`, collected by converters/registry.py),
beyond llama (tests/test_converters.py).

Each case saves a tiny random transformers model and writes it as a GGUF the way llama.cpp's convert_hf_to_gguf.py
does: tensor names from gguf's own `TensorNameMap`, the metadata keys of that architecture's convert class and its
layout changes (gemma's and gemma2's norms + 1, gpt2's transposed Conv1D weights, falcon's q/k/v regrouping).
Every case must convert to the params the HF checkpoint converts to (through that family's HF converter); a few
cases generate, against transformers' tokens and logits on the original model; a Q8_0 file is checked against
transformers' own GGUF loader, which dequantizes it the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file
from safetensors.torch import save_file
from transformers import (
    CohereConfig,
    FalconConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GraniteConfig,
    Olmo2Config,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
    Starcoder2Config,
)

from converters import (
    SUPPORTED_MODEL_TYPES,
    CheckpointError,
    load_checkpoint,
    load_config,
)
from converters.gguf_file import SUPPORTED_ARCHITECTURES
from converters.registry import GGUF_ARCHITECTURES as ARCHITECTURES
from hdex_jax.config import ModelConfig
from tests.family_parity import Reference, save_random_model
from tests.helpers_tiny import llamacpp_permute

VOCAB = 128
_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
_SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, **_IDS)


def _rope(theta: float = 10000.0, **extra: float) -> dict:
    return {"rope_parameters": {"rope_type": "default", "rope_theta": theta, **extra}}


# ------------------------------------------------------------------------------- llama.cpp's convert, per arch


def _sizes(w: gguf.GGUFWriter, c: PretrainedConfig) -> None:
    """The sizes every architecture's metadata carries."""
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)


def _text_model(w: gguf.GGUFWriter, c: PretrainedConfig) -> None:
    """TextModel.set_gguf_parameters, the default of the convert script (qwen2, starcoder2)."""
    _sizes(w, c)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    if hasattr(c, "rms_norm_eps"):
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
    else:
        w.add_layer_norm_eps(c.norm_epsilon)


def _phi3(w: gguf.GGUFWriter, c: PretrainedConfig) -> None:
    _sizes(w, c)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(int(c.rope_parameters["partial_rotary_factor"] * c.hidden_size)
                               // c.num_attention_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_sliding_window(c.sliding_window or 0)


def _gemma(w: gguf.GGUFWriter, c: PretrainedConfig) -> None:
    # No rope.freq_base: the convert class does not write it (Gemma's theta is llama.cpp's default).
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)


def _gemma2(w: gguf.GGUFWriter, c: PretrainedConfig) -> None:
    _gemma(w, c)
    w.add_attn_logit_softcapping(c.attn_logit_softcapping)
    w.add_final_logit_softcapping(c.final_logit_softcapping)
    w.add_sliding_window(c.sliding_window)


def _qwen3(w: gguf.GGUFWriter, c: PretrainedConfig) -> None:
    _text_model(w, c)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)


def _gemma3(w: gguf.GGUFWriter, c: PretrainedConfig) -> None:
    # The layer pattern and the sliding layers' theta are left to llama.cpp's fixed values.
    _gemma(w, c)
    w.add_sliding_window(c.sliding_window)
    w.add_rope_freq_base(c.rope_parameters["full_attention"]["rope_theta"])


def _granite(w: gguf.GGUFWriter, c: PretrainedConfig) -> None:
    _text_model(w, c)
    w.add_embedding_scale(c.embedding_multiplier)
    w.add_residual_scale(c.residual_multiplier)
    w.add_attention_scale(c.attention_multiplier)
    w.add_logit_scale(c.logits_scaling)


def _command_r(w: gguf.GGUFWriter, c: PretrainedConfig) -> None:
    _sizes(w, c)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_eps(c.layer_norm_eps)
    w.add_logit_scale(c.logit_scale)


def _gpt2(w: gguf.GGUFWriter, c: PretrainedConfig) -> None:
    w.add_block_count(c.n_layer)
    w.add_context_length(c.n_positions)
    w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(4 * c.n_embd)
    w.add_head_count(c.n_head)
    w.add_layer_norm_eps(c.layer_norm_epsilon)


def _falcon_kv_heads(c: PretrainedConfig) -> int:
    return c.num_kv_heads if c.new_decoder_architecture else 1  # multi_query


def _falcon(w: gguf.GGUFWriter, c: PretrainedConfig, layout: str = "jploski") -> None:
    w.add_context_length(2048)  # hard-coded by the convert class
    w.add_tensor_data_layout(layout)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(4 * c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(_falcon_kv_heads(c))
    w.add_layer_norm_eps(c.layer_norm_epsilon)


def _gemma_layout(name: str, x: np.ndarray, c: PretrainedConfig) -> np.ndarray:
    return x + 1 if name.endswith("norm.weight") else x


def _llama_layout(name: str, x: np.ndarray, c: PretrainedConfig) -> np.ndarray:
    """q/k rows permuted for llama.cpp's adjacent-pair rope (LlamaModel's convert, which granite inherits)."""
    if name.endswith("q_proj.weight"):
        return llamacpp_permute(x, c.num_attention_heads)
    if name.endswith("k_proj.weight"):
        return llamacpp_permute(x, c.num_key_value_heads)
    return x


def _gpt2_layout(name: str, x: np.ndarray, c: PretrainedConfig) -> np.ndarray:
    return x.T if name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")) else x


def _falcon_layout(name: str, x: np.ndarray, c: PretrainedConfig) -> np.ndarray:
    """Per KV group [q.., k, v] -> all q, all k, all v (the convert class's "jploski" transform)."""
    if "query_key_value" not in name:
        return x
    heads, kv, hd = c.num_attention_heads, _falcon_kv_heads(c), c.hidden_size // c.num_attention_heads
    qkv = x.reshape(kv, heads // kv + 2, hd, x.shape[-1])
    q = qkv[:, :-2].reshape(heads * hd, -1)
    k = qkv[:, -2].reshape(kv * hd, -1)
    v = qkv[:, -1].reshape(kv * hd, -1)
    return np.concatenate([q, k, v])


def _keep(name: str, x: np.ndarray, c: PretrainedConfig) -> np.ndarray:
    return x


def _falcon_config(**layout: object) -> FalconConfig:
    """A tiny rope Falcon (the kind llama.cpp converts) with the attention `layout` of one Falcon generation."""
    settings = {"new_decoder_architecture": False, **layout}
    return FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, bias=False,
                        alibi=False, tie_word_embeddings=False, **_IDS, **settings)


@dataclasses.dataclass(frozen=True)
class Case:
    arch: str
    config: Callable[[], PretrainedConfig]
    metadata: Callable[[gguf.GGUFWriter, PretrainedConfig], None]
    layout: Callable[[str, np.ndarray, PretrainedConfig], np.ndarray] = _keep
    # ModelConfig fields the converted GGUF must have.
    expect: dict = dataclasses.field(default_factory=dict)


CASES = {
    # Tied, with q/k/v biases (Qwen2-0.5B).
    "qwen2": Case("qwen2", lambda: Qwen2Config(**_SIZES, tie_word_embeddings=True, use_sliding_window=False,
                                               **_rope(1e6)), _text_model,
                  expect={"tie_embeddings": True, "qkv_bias": True, "o_bias": False, "rope_theta": 1e6}),
    # Fused attn_qkv and gate+up; partial rotary (Phi-4-mini); a sliding window longer than these prompts.
    "phi3": Case("phi3", lambda: Phi3Config(**_SIZES, sliding_window=64, tie_word_embeddings=False,
                                            **_rope(partial_rotary_factor=0.5)), _phi3,
                 expect={"partial_rotary_factor": 0.5, "sliding_window": 64, "tie_embeddings": False}),
    # Norms stored + 1, embedding scale, head_dim apart from hidden / heads, one KV head, tied.
    "gemma": Case("gemma", lambda: GemmaConfig(**{**_SIZES, "num_key_value_heads": 1}, head_dim=32, **_rope()),
                  _gemma, _gemma_layout, expect={"head_dim": 32, "num_kv_heads": 1, "embed_scale": 8.0,
                                                 "activation": "gelu_tanh", "tie_embeddings": True}),
    # Gemma 2: post-sublayer norms (+ 1 too), score and logit soft-caps, a window on even layers that these prompts
    # exceed, a query scale of head_dim as llama.cpp assumes (soft-caps small enough to matter).
    "gemma2": Case("gemma2", lambda: Gemma2Config(**_SIZES, head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
                                                  attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                                  **_rope()), _gemma2, _gemma_layout,
                   expect={"post_norms": True, "attn_softcap": 2.0, "final_softcap": 3.0, "sliding_window": 6,
                           "sliding_layers": (True, False), "attention_scale": None}),
    # Per-head q/k norms, head_dim apart from hidden / heads.
    "qwen3": Case("qwen3", lambda: Qwen3Config(**_SIZES, head_dim=24, **_rope(1e6)), _qwen3,
                  expect={"qk_norm": "head", "head_dim": 24, "rope_theta": 1e6}),
    # Gemma 3: norms (q/k norms too) stored + 1; llama.cpp's layer pattern (both of 2 layers slide) and local theta.
    "gemma3": Case("gemma3", lambda: Gemma3TextConfig(**_SIZES, head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
                                                      rope_parameters={
                                                          "full_attention": {"rope_type": "default", "rope_theta": 1e5},
                                                          "sliding_attention": {"rope_type": "default",
                                                                                "rope_theta": 1e4}}),
                   _gemma3, _gemma_layout,
                   expect={"qk_norm": "head", "post_norms": True, "sliding_window": 6, "sliding_layers": (True, True),
                           "rope_theta": 1e5, "rope_local_theta": 1e4, "attention_scale": None}),
    # OLMo 2: output norms only, q/k norms over all heads.
    "olmo2": Case("olmo2", lambda: Olmo2Config(**_SIZES, **_rope()), _text_model,
                  expect={"qk_norm": "all", "input_norms": False, "post_norms": True}),
    # Granite: q/k rows permuted as for llama; the four multipliers (float32 in GGUF: exact ones here).
    "granite": Case("granite", lambda: GraniteConfig(**_SIZES, embedding_multiplier=12.0, residual_multiplier=0.25,
                                                     attention_multiplier=0.5, logits_scaling=0.25, **_rope()),
                    _granite, _llama_layout,
                    expect={"embed_scale": 12.0, "residual_scale": 0.25, "attention_scale": 0.5, "logit_scale": 4.0}),
    # Command-R: parallel block, LayerNorm without bias, interleaved rope, per-head q/k LayerNorm, logit scale, tied.
    "command-r": Case("command-r", lambda: CohereConfig(**_SIZES, use_qk_norm=True, logit_scale=0.5, **_rope()),
                      _command_r, expect={"norm": "layernorm", "norm_bias": False, "parallel_residual": True,
                                          "qk_norm": "head", "logit_scale": 0.5, "tie_embeddings": True}),
    # LayerNorm, biases everywhere, ungated GELU MLP.
    "starcoder2": Case("starcoder2", lambda: Starcoder2Config(**_SIZES, use_bias=True, tie_word_embeddings=False,
                                                               **_rope()), _text_model,
                       expect={"norm": "layernorm", "qkv_bias": True, "o_bias": True, "mlp_bias": True,
                               "activation": "gelu_tanh"}),
    # Learned positions, transposed Conv1D weights, fused attn_qkv with a fused bias.
    "gpt2": Case("gpt2", lambda: GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                            **_IDS), _gpt2, _gpt2_layout,
                 expect={"positions": "learned", "qkv_bias": True, "intermediate_size": 256, "tie_embeddings": True}),
    # Falcon-40B style: grouped q/k/v regrouped by the convert script, ln_attn / ln_mlp as attn_norm_2 / attn_norm.
    "falcon": Case("falcon", lambda: _falcon_config(num_kv_heads=2, new_decoder_architecture=True), _falcon,
                   _falcon_layout, expect={"parallel_residual": True, "shared_norm": False, "num_kv_heads": 2}),
    # Falcon-7B style: multi-query, one norm shared by the parallel attention and MLP.
    "falcon-7b": Case("falcon", lambda: _falcon_config(multi_query=True, parallel_attn=True), _falcon,
                      _falcon_layout, expect={"parallel_residual": True, "shared_norm": True, "num_kv_heads": 1}),
}


def write_gguf(hf_dir: Path, path: Path, case: Case, tensor_type: str = "F32",
               extra: dict[str, np.ndarray] | None = None) -> Path:
    """Write the checkpoint in `hf_dir` as llama.cpp's convert script would, 2-D weights as `tensor_type`."""
    config = transformers.AutoConfig.from_pretrained(hf_dir)
    qtype = gguf.GGMLQuantizationType[tensor_type]
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == case.arch)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), case.arch)
    case.metadata(writer, config)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"<t{i}>" for i in range(VOCAB)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(3)
    for name, value in load_file(hf_dir / "model.safetensors").items():
        value = case.layout(name, value.astype(np.float32), config)
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, f"gguf has no {case.arch} name for {name}"
        # The convert script keeps 1-D tensors and position embeddings in F32.
        f32 = gguf.GGMLQuantizationType.F32
        ttype = qtype if value.ndim == 2 and not gguf_name.startswith("position_embd") else f32
        data = value if ttype == f32 else gguf.quants.quantize(value, ttype)
        writer.add_tensor(gguf_name, data, raw_dtype=ttype)
    for name, value in (extra or {}).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module", params=list(CASES))
def files(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Case, Path, Path]:
    """A case, its saved HF directory and the GGUF written from it."""
    case = CASES[request.param]
    hf_dir = save_random_model(case.config(), tmp_path_factory.mktemp(request.param))
    return case, hf_dir, write_gguf(hf_dir, hf_dir / f"{request.param}.gguf", case)


def test_gguf_params_match_hf_checkpoint(files: tuple[Case, Path, Path]) -> None:
    """The GGUF converts to the same config facts and the same canonical params as the HF checkpoint it was
    written from (through that family's HF converter, when it is registered)."""
    case, hf_dir, path = files
    cfg = load_config(path)
    assert cfg.model_type == case.arch
    assert {k: getattr(cfg, k) for k in case.expect} == case.expect
    model_type = transformers.AutoConfig.from_pretrained(hf_dir).model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        pytest.skip(f"no HF converter for model_type {model_type!r} on this branch")
    from_gguf, from_hf = load_checkpoint(path)[1], load_checkpoint(hf_dir)[1]
    assert from_gguf.keys() == from_hf.keys()
    for name, value in from_hf.items():
        np.testing.assert_allclose(from_gguf[name], value, rtol=0, atol=1e-6, err_msg=name)


# Generation on one device against transformers, for the cases whose GGUF path carries a mechanism of its own
# (fused q/k/v with biases and learned positions; Gemma 2's norms stored + 1, embedding scale, soft-caps and
# alternating window; Falcon-40B's q/k/v regrouping and swapped norm names; Command-R's interleaved rope, q/k norms,
# parallel block and logit scale). Kept to a few: each compiles its own model.
GENERATED = ("gpt2", "gemma2", "falcon", "command-r")


@pytest.mark.parametrize("name", GENERATED)
def test_gguf_generation_matches_transformers(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    hf_dir = save_random_model(case.config(), tmp_path / "hf")
    path = write_gguf(hf_dir, tmp_path / f"{name}.gguf", case)
    dataclasses.replace(Reference.of(hf_dir), directory=path).check(num_device=1)


def test_quantized_gguf_matches_transformers_gguf_loader(tmp_path: Path) -> None:
    """Q8_0 Phi-3 (fused tensors split after dequantization) against transformers loading the same file."""
    case = dataclasses.replace(CASES["phi3"], config=lambda: Phi3Config(**_SIZES, tie_word_embeddings=False,
                                                                          **_rope(5e5)))
    hf_dir = save_random_model(case.config(), tmp_path / "hf")
    path = write_gguf(hf_dir, tmp_path / "phi3.Q8_0.gguf", case, "Q8_0")
    # transformers' loader dequantizes with gguf too; its float32 weights, saved as a checkpoint, are the reference.
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    reference_dir = tmp_path / "from_gguf"
    model.config.save_pretrained(reference_dir)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, reference_dir / "model.safetensors",
              metadata={"format": "pt"})
    # Really quantized: the Q8_0 weights differ from those of the F32 checkpoint.
    quantized = load_file(reference_dir / "model.safetensors")["model.layers.0.self_attn.qkv_proj.weight"]
    assert not np.array_equal(quantized, load_file(hf_dir / "model.safetensors")[
        "model.layers.0.self_attn.qkv_proj.weight"])
    dataclasses.replace(Reference.of(reference_dir), directory=path).check(num_device=1)


def test_declared_tensor_names_are_gguf_names() -> None:
    """Every key-map rule matches a tensor name gguf's MODEL_TENSORS declares for its architecture."""
    assert SUPPORTED_ARCHITECTURES == tuple(sorted(ARCHITECTURES))
    base = ModelConfig(model_type="x", vocab_size=8, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                       head_dim=4, intermediate_size=8, max_position_embeddings=8, embed_dim=8)
    for name, arch in ARCHITECTURES.items():
        model_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == name)
        known = {gguf.TENSOR_NAMES[t].format(bid=0) + suffix for t in gguf.MODEL_TENSORS[model_arch]
                 for suffix in (".weight", ".bias")}
        for cfg in (base, dataclasses.replace(base, parallel_residual=True, shared_norm=True),
                    dataclasses.replace(base, qk_norm="head")):
            for rule in arch.key_map(cfg):
                assert any(rule.regex.fullmatch(n) for n in known), f"{name}: {rule.pattern} is no gguf {name} tensor"


def test_falcon_of_another_qkv_layout_is_refused(tmp_path: Path) -> None:
    case = dataclasses.replace(CASES["falcon"], metadata=lambda w, c: _falcon(w, c, layout="interleaved"))
    path = write_gguf(save_random_model(case.config(), tmp_path / "hf"), tmp_path / "other.gguf", case)
    with pytest.raises(CheckpointError, match="tensor_data_layout='interleaved'"):
        load_config(path)
