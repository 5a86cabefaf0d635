"""Number formats (hdex_jax.formats) end to end on a tiny Llama with 32-wide heads (so every projection's inputs
split into groups of 32): compile and load in each format on 1 and 3 devices, the values a quantized model
computes with, seeded sampling in each format, float16 overflow, and a format that does not match."""

import numpy as np
import pytest
import torch
import transformers

from hdex_jax import artifacts, formats, hub, quant
from hdex_jax.cli import main
from hdex_jax.config import ModelConfig
from hdex_jax.generation import generate_recorded, place, prepare_batch
from hdex_jax.params import flatten, param_specs
from hdex_jax.sampling import SamplingConfig
from hdex_jax.tools import AutoCompiler
from hdex_jax.transformers import AutoModelForCausalLM
from tests.family_parity import save_random_model
from tests.helpers_tiny import save_tiny_tokenizer

MAX_LENGTH = 64
PROMPTS = [[3, 17, 42, 9, 5], [7, 7, 100, 2, 64, 1, 30]]
STEPS = 6
# On 1 device every format; on 3 the two that shard differently (16-bit activations, quantized scales).
ROUND_TRIPS = [(1, "float16", None), (1, "bfloat16", None), (1, "float32", "int8"), (1, "float32", "int4"),
               (3, "float16", None), (3, "float32", "int4")]


def _config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def checkpoint(home, tmp_path_factory):
    directory = save_random_model(_config(), tmp_path_factory.mktemp("formats") / "tiny-llama-hd32")
    save_tiny_tokenizer(directory)
    return str(directory)


def _stored(checkpoint: str) -> tuple[ModelConfig, dict]:
    return artifacts.read_ckpt(artifacts.ckpt_dir(hub.model_dir(checkpoint)))


def _torch_logits(checkpoint: str, weights: dict[str, np.ndarray] | None, prompt: list[int], dtype: torch.dtype):
    """transformers' greedy tokens and logits of each step, optionally with other (dequantized) weights."""
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    if weights is not None:
        model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    model = model.to(dtype)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=STEPS, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True, repetition_penalty=1.0)
    return out.sequences[0, len(prompt):].tolist(), torch.stack(out.logits, 1)[0].float().numpy()


def _hf_weights(cfg: ModelConfig, flat: dict) -> dict[str, np.ndarray]:
    """Canonical weights (QuantArrays dequantized) in transformers' Llama names and layout."""
    def f(name: str) -> np.ndarray:
        value = flat[name]
        return np.asarray(quant.dequantize_np(value) if quant.is_quant(value) else value, np.float32)

    out = {"model.embed_tokens.weight": f("embed"), "model.norm.weight": f("final_norm/scale"),
           "lm_head.weight": f("lm_head/w").T}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = f("layers/ln1/scale")[i]
        out[p + "post_attention_layernorm.weight"] = f("layers/ln2/scale")[i]
        for name in ("q", "k", "v"):
            w = f(f"layers/attn/{name}/w")[i]  # [D, heads, hd]
            out[p + f"self_attn.{name}_proj.weight"] = w.reshape(w.shape[0], -1).T
        out[p + "self_attn.o_proj.weight"] = f("layers/attn/o/w")[i].reshape(-1, cfg.hidden_size).T
        for name in ("gate", "up", "down"):
            out[p + f"mlp.{name}_proj.weight"] = f(f"layers/mlp/{name}/w")[i].T
    return out


@pytest.mark.parametrize("num_device,dtype,quantize", ROUND_TRIPS)
def test_each_format_round_trips_and_computes_with_its_values(checkpoint, dtype, quantize, num_device):
    AutoCompiler().compile(checkpoint, num_device=num_device, max_length=MAX_LENGTH, dtype=dtype, quantize=quantize)
    params_dir = artifacts.param_dir(hub.model_dir(checkpoint), num_device)
    manifest = artifacts.read_manifest(params_dir)
    assert (manifest["dtype"], manifest["quantize"]) == (dtype, quantize)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"lpu": num_device})
    stored, flat = _stored(checkpoint)
    cfg = formats.compiled_config(stored, dtype, quantize)
    specs = flatten(param_specs(cfg))
    if quantize:
        # Every projection quantized, the embedding and the LM head left in dtype.
        assert {n for n, _ in cfg.weight_formats} == {n for n, s in specs.items() if s.inputs} - {"embed", "lm_head/w"}
        assert model.decode.cfg.weight_formats and model.decode.cfg.dtype == dtype
    weights = formats.convert_params(flat, cfg)
    reference = _hf_weights(cfg, weights) if quantize else None
    torch_dtype = getattr(torch, dtype)
    for prompt in PROMPTS:
        tokens, logits = _torch_logits(checkpoint, reference, prompt, torch.float32)
        out = model.generate(prompt, max_new_tokens=STEPS, do_sample=False, repetition_penalty=1.0, stop=[],
                             return_dict_in_generate=True, output_logits=True)
        got = np.stack([np.asarray(step)[0] for step in out.logits])
        if dtype == "float32":
            # Weight-only formats compute in float32 on the dequantized values: transformers on those values.
            np.testing.assert_allclose(got, logits, atol=1e-4, rtol=0)
            assert out.new_tokens[0] == tokens
        else:
            # 16-bit activations: close to transformers run in the same dtype on the same weights.
            _, same_dtype = _torch_logits(checkpoint, reference, prompt, torch_dtype)
            scale = np.abs(logits).max()
            assert np.abs(got - same_dtype).max() < 0.05 * scale, np.abs(got - same_dtype).max()


@pytest.mark.parametrize("dtype,quantize", [("float16", "int4")])
def test_seeded_sampling_in_a_format_does_not_depend_on_batch_or_devices(checkpoint, dtype, quantize):
    stored, flat = _stored(checkpoint)
    cfg = formats.compiled_config(stored, dtype, quantize)
    weights = formats.convert_params(flat, cfg)
    sampling = SamplingConfig(do_sample=True, top_k=0, top_p=0.9, temperature=1.0, repetition_penalty=1.0)

    def tokens(prompts: list[list[int]], seeds: list[int], num_device: int) -> list[list[int]]:
        batch = prepare_batch(prompts, max_length=MAX_LENGTH, max_new_tokens=12, stop=[], pad_id=0, seed=seeds,
                              sampling=sampling)
        return generate_recorded(place(cfg, weights, num_device), batch).tokens

    alone = tokens([PROMPTS[1]], [5], 1)[0]
    assert tokens([PROMPTS[0], PROMPTS[1]], [4, 5], 1)[1] == alone
    assert tokens([PROMPTS[1], PROMPTS[0]], [5, 4], 3)[0] == alone


def test_float16_overflow_is_clipped_not_inf(home, tmp_path):
    """A model built to overflow float16: constant embeddings and MLP weights whose products reach 786432 (every
    weight fits float16 easily). float32 shows activations beyond float16's range; float16 clips them to 65504
    and stays finite, where an unclipped datapath would carry inf (and NaN after the next norm)."""
    config = _config()
    directory = save_random_model(config, tmp_path / "overflowing")
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    state = model.state_dict()
    for name, value in state.items():
        if name.endswith(("embed_tokens.weight", "layernorm.weight", "mlp.down_proj.weight")):
            value.fill_(1.0)
        elif name.endswith(("gate_proj.weight", "up_proj.weight")):
            value.fill_(0.5)
    model.load_state_dict(state)
    model.save_pretrained(directory)
    save_tiny_tokenizer(directory)
    with torch.no_grad():
        hidden = model(torch.tensor([PROMPTS[0]]), output_hidden_states=True).hidden_states
    assert max(float(h.abs().max()) for h in hidden) > float(np.finfo(np.float16).max)
    AutoCompiler().compile(str(directory), num_device=1, max_length=MAX_LENGTH, dtype="float16", quantize=None)
    loaded = AutoModelForCausalLM.from_pretrained(str(directory), device_map={"lpu": 1})
    out = loaded.generate(PROMPTS[0], max_new_tokens=3, do_sample=False, stop=[], return_dict_in_generate=True,
                          output_logits=True)
    assert all(np.isfinite(np.asarray(step)).all() for step in out.logits)


def test_a_model_compiled_in_one_format_does_not_load_as_another(checkpoint):
    AutoCompiler().compile(checkpoint, num_device=2, max_length=MAX_LENGTH, dtype="bfloat16", quantize=None)
    with pytest.raises(ValueError, match=r"in bfloat16, not float16.*dtype='float16'"):
        AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"lpu": 2}, dtype="float16")
    assert AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"lpu": 2}).decode.cfg.dtype == "bfloat16"


@pytest.mark.parametrize("argument,value", [("dtype", "float64"), ("quantize", "int3")])
def test_bad_format_names_the_argument(checkpoint, argument, value):
    with pytest.raises(ValueError, match=f"{argument} must be one of"):
        AutoCompiler().compile(checkpoint, num_device=1, max_length=MAX_LENGTH, **{argument: value})


def test_models_and_estimate_report_the_compiled_format(checkpoint, capsys):
    AutoCompiler().compile(checkpoint, num_device=1, max_length=MAX_LENGTH, dtype="float32", quantize="int4")
    capsys.readouterr()
    assert main(["models"]) == 0
    assert "tiny-llama-hd32 on 1 device(s): float32; quantized: int4 for 7 weights" in capsys.readouterr().out
    assert main(["estimate", checkpoint, "--devices", "1"]) == 0
    compiled = capsys.readouterr().out
    assert "compiled in (float32, matrices int4)" in compiled and "of int4 weights" in compiled
    assert main(["estimate", checkpoint, "--devices", "1", "--dtype", "float16"]) == 0
    assert "of float16 weights" in capsys.readouterr().out
