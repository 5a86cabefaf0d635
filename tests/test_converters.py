"""Converters: HF safetensors and GGUF checkpoints -> canonical params.

Weights are checked against the transformers model that reads the same files, by what they compute:
`torch_linear(x)` must equal `x · w + b` with the canonical weight, so a wrong transpose, head split or
q/k permutation fails even though shapes agree. Error tests check that the message names the culprit.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from converters import (SUPPORTED_MODEL_TYPES, CheckpointError, UnsupportedModelError, config_from_hf,
                        load_checkpoint, load_config, load_tokenizer, save_tokenizer)
from hdex_jax import quant
from hdex_jax.config import ModelConfig
from hdex_jax.params import check_params, flatten, param_specs, unflatten
from tests.helpers_tiny import (FAMILIES, gguf_name, save_tiny_model, save_tiny_tokenizer, tiny_hf_config,
                                write_tiny_gguf)

GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")

# Canonical per-layer names -> submodule of a decoder layer, per layout.
_LLAMA_LINEARS = {"attn/q": "self_attn.q_proj", "attn/k": "self_attn.k_proj", "attn/v": "self_attn.v_proj",
                  "attn/o": "self_attn.o_proj", "mlp/gate": "mlp.gate_proj", "mlp/up": "mlp.up_proj",
                  "mlp/down": "mlp.down_proj"}
_LLAMA_NORMS = {"ln1": "input_layernorm", "ln2": "post_attention_layernorm"}
_OPT_LINEARS = {"attn/q": "self_attn.q_proj", "attn/k": "self_attn.k_proj", "attn/v": "self_attn.v_proj",
                "attn/o": "self_attn.out_proj", "mlp/up": "fc1", "mlp/down": "fc2"}
_OPT_NORMS = {"ln1": "self_attn_layer_norm", "ln2": "final_layer_norm"}

_LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 32}
EXPECTED_CONFIG = {
    "llama": dict(norm="rmsnorm", positions="rope", rope_theta=10000.0, rope_scaling=(), sliding_window=None,
                  num_kv_heads=2, head_dim=16, qkv_bias=False, o_bias=False, tie_embeddings=False,
                  eos_token_ids=(2,), bos_token_id=1, activation="silu", gated_mlp=True),
    "llama3": dict(rope_theta=500000.0, rope_scaling=tuple(sorted(_LLAMA3_SCALING.items())), tie_embeddings=True,
                   eos_token_ids=(2, 3)),
    "mistral": dict(sliding_window=32, qkv_bias=False, tie_embeddings=False),
    "qwen2": dict(rope_theta=1e6, sliding_window=None, qkv_bias=True, o_bias=False, mlp_bias=False),
    "opt": dict(norm="layernorm", norm_eps=1e-5, positions="learned", position_offset=2, pre_norm=True,
                final_norm=True, activation="relu", gated_mlp=False, qkv_bias=True, o_bias=True, mlp_bias=True,
                tie_embeddings=True, embed_dim=64, num_kv_heads=4, pad_token_id=1, eos_token_ids=(2,)),
    "opt350m": dict(pre_norm=False, final_norm=False, embed_dim=32, hidden_size=64, tie_embeddings=True),
}


# --------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`saved(family, shards=False)`: the tiny model's checkpoint directory, written once per module."""
    cache: dict[tuple[str, bool], Path] = {}

    def get(family: str, shards: bool = False) -> Path:
        if (family, shards) not in cache:
            directory = tmp_path_factory.mktemp(f"{family}{'-sharded' if shards else ''}")
            cache[family, shards] = save_tiny_model(family, directory, shards=shards)
        return cache[family, shards]

    return get


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _assert_linear(lin: torch.nn.Linear, w: np.ndarray, b: np.ndarray | None, n_in_dims: int) -> None:
    """`lin(x) == x · w + b`, with x reshaped to w's leading `n_in_dims` dims and the output flattened."""
    assert (b is None) == (lin.bias is None)
    x = torch.randn(3, lin.in_features, dtype=torch.float64)
    bias = None if lin.bias is None else lin.bias.detach().double()
    expected = torch.nn.functional.linear(x, lin.weight.detach().double(), bias).numpy()
    got = np.tensordot(x.numpy().reshape(3, *w.shape[:n_in_dims]), w.astype(np.float64), axes=n_in_dims)
    if b is not None:
        got = got + b
    np.testing.assert_allclose(got.reshape(3, -1), expected, rtol=0, atol=1e-10)


def assert_matches_torch(model: torch.nn.Module, cfg: ModelConfig, params: dict[str, np.ndarray]) -> None:
    """Every canonical weight is the torch model's weight, checked by what it computes; none is left over."""
    check_params(unflatten(params), cfg)
    # Weights kept as stored (GGUF blocks) are compared through their float32 values, which must be exactly
    # gguf's and transformers' dequantization.
    params = {name: quant.dequantize_np(v) if quant.is_quant(v) else v for name, v in params.items()}
    assert all(v.dtype == np.float32 for v in params.values())
    opt = cfg.model_type == "opt"
    decoder = model.model.decoder if opt else model.model
    linears, norms = (_OPT_LINEARS, _OPT_NORMS) if opt else (_LLAMA_LINEARS, _LLAMA_NORMS)
    seen: set[str] = set()

    def param(name: str) -> np.ndarray:
        seen.add(name)
        return params[name]

    def bias(name: str, layer: int) -> np.ndarray | None:
        return param(name)[layer] if name in params else None

    def assert_norm(norm: torch.nn.Module, prefix: str, layer: int | None) -> None:
        at = (lambda a: a) if layer is None else (lambda a: a[layer])
        np.testing.assert_array_equal(at(param(f"{prefix}/scale")), norm.weight.detach().numpy())
        if getattr(norm, "bias", None) is not None:
            np.testing.assert_array_equal(at(param(f"{prefix}/bias")), norm.bias.detach().numpy())

    torch.manual_seed(0)
    np.testing.assert_array_equal(param("embed"), decoder.embed_tokens.weight.detach().numpy())
    assert len(decoder.layers) == cfg.num_layers
    for i, layer in enumerate(decoder.layers):
        for key, path in linears.items():
            _assert_linear(layer.get_submodule(path), param(f"layers/{key}/w")[i], bias(f"layers/{key}/b", i),
                           n_in_dims=2 if key == "attn/o" else 1)
        for key, path in norms.items():
            assert_norm(layer.get_submodule(path), f"layers/{key}", i)
    final = decoder.final_layer_norm if opt else decoder.norm
    if final is not None:
        assert_norm(final, "final_norm", None)
    if opt:
        np.testing.assert_array_equal(param("pos_embed"), decoder.embed_positions.weight.detach().numpy())
        if decoder.project_in is not None:
            _assert_linear(decoder.project_in, param("project_in"), None, 1)
            _assert_linear(decoder.project_out, param("project_out"), None, 1)
    if cfg.tie_embeddings:
        assert "lm_head/w" not in params
    else:
        _assert_linear(model.lm_head, param("lm_head/w"), None, 1)
    assert seen == set(params)


def _from_pretrained(path: Path, **kwargs) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


# ------------------------------------------------------------------------------------ HF safetensors


@pytest.mark.parametrize("family", FAMILIES)
def test_family_weights_match_transformers(family: str, saved: Callable[..., Path]) -> None:
    directory = saved(family)
    cfg, params = load_checkpoint(directory)
    for field, value in EXPECTED_CONFIG[family].items():
        assert getattr(cfg, field) == value, field
    assert cfg.num_layers == 2 and cfg.vocab_size == 128 and cfg.max_position_embeddings == 128
    assert load_config(directory) == cfg == load_config(directory / "config.json")
    model = _from_pretrained(directory)
    assert_matches_torch(model, cfg, params)
    if cfg.positions == "rope":  # the rope config (theta, llama3 scaling) gives transformers' frequencies
        np.testing.assert_allclose(cfg.rope_inv_freq(), model.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)


@pytest.mark.parametrize("family", ["llama", "opt350m"])
def test_sharded_equals_single_file(family: str, saved: Callable[..., Path]) -> None:
    sharded = saved(family, shards=True)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    cfg_single, single = load_checkpoint(saved(family))
    cfg_sharded, params = load_checkpoint(sharded)
    assert cfg_sharded == cfg_single and params.keys() == single.keys()
    for name in single:
        np.testing.assert_array_equal(params[name], single[name], err_msg=name)


def test_progress_bar(saved: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    load_checkpoint(saved("llama"), progress=True)
    assert "converting" in capsys.readouterr().err


def _hf_dict(family: str) -> dict:
    return json.loads(tiny_hf_config(family).to_json_string())


@pytest.mark.parametrize("key", ["type", "rope_type"])
def test_old_hub_rope_style_equals_new(key: str) -> None:
    """Older Hub files: top-level rope_theta + rope_scaling (with "type" or "rope_type")."""
    new = _hf_dict("llama3")
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    scaling = {k: v for k, v in new["rope_parameters"].items() if k not in ("rope_theta", "rope_type")}
    old.update(rope_theta=new["rope_parameters"]["rope_theta"], rope_scaling={key: "llama3", **scaling})
    assert config_from_hf(old) == config_from_hf(new)


def test_linear_rope_scaling_and_unsupported_kind() -> None:
    hf = {k: v for k, v in _hf_dict("llama").items() if k != "rope_parameters"}
    cfg = config_from_hf({**hf, "rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0}})
    np.testing.assert_allclose(cfg.rope_inv_freq(), 1.0 / 10000 ** (np.arange(0, 16, 2) / 16) / 2.0)
    with pytest.raises(CheckpointError, match="rope scaling type 'proportional' is not supported"):
        config_from_hf({**hf, "rope_scaling": {"rope_type": "proportional", "factor": 4.0}})


@pytest.mark.parametrize("settings, window", [
    (dict(use_sliding_window=False, sliding_window=4096), None),
    (dict(use_sliding_window=True, sliding_window=4096, max_window_layers=0, layer_types=None), 4096),
    (dict(use_sliding_window=True, sliding_window=4096, max_window_layers=2, layer_types=None), None),
])
def test_qwen2_sliding_window(settings: dict, window: int | None) -> None:
    assert config_from_hf({**_hf_dict("qwen2"), **settings}).sliding_window == window


def test_qwen2_window_on_some_layers_only() -> None:
    hf = {**_hf_dict("qwen2"), "use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 1,
          "layer_types": None}
    cfg = config_from_hf(hf)
    assert [cfg.window(i) for i in range(cfg.num_layers)] == [None] + [4096] * (cfg.num_layers - 1)


# ---------------------------------------------------------------------------------------------- GGUF


def _llama_from_gguf_reference(path: Path) -> torch.nn.Module:
    """A torch llama holding gguf's own dequantization of `path`, with llama.cpp's q/k permutation undone
    (written out here independently of the converter)."""
    hf = tiny_hf_config("llama")
    reader = gguf.GGUFReader(path)
    dequantized = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    state = {}
    for name in LlamaForCausalLM(hf).state_dict():
        w = np.array(dequantized[gguf_name(name)], dtype=np.float32)
        heads = {"q_proj": hf.num_attention_heads, "k_proj": hf.num_key_value_heads}.get(name.split(".")[-2])
        if heads:  # rows of each head were stored as (pair index, 2): put the two halves back
            rows, cols = w.shape
            w = w.reshape(heads, rows // heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)
        state[name] = torch.from_numpy(w)
    model = LlamaForCausalLM(hf)
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.mark.parametrize("tensor_type", GGUF_TYPES)
def test_gguf_matches_dequantized_and_transformers(tensor_type: str, tmp_path: Path) -> None:
    path = tmp_path / f"tiny-{tensor_type}.gguf"
    written = write_tiny_gguf(path, tensor_type)
    cfg, params = load_checkpoint(path)
    # The metadata gives the architecture; which weights stay as stored is known once the tensors are mapped.
    assert load_config(path) == dataclasses.replace(cfg, weight_formats=())
    kept = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}.get(tensor_type)
    # Every matrix but o, whose blocks of 32 inputs span two of the tiny model's 16-wide heads.
    assert dict(cfg.weight_formats) == ({name: kept for name, spec in flatten(param_specs(cfg)).items()
                                         if spec.inputs and name != "layers/attn/o/w"} if kept else {})
    assert (cfg.model_type, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == ("llama", 4, 2, 16, 128)
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id, cfg.tie_embeddings) == (1, (2,), 3, False)
    assert cfg.rope_theta == 10000.0 and cfg.rope_scaling == () and cfg.intermediate_size == 96
    assert_matches_torch(_llama_from_gguf_reference(path), cfg, params)
    # Independent reference: transformers' own GGUF loader on the same file.
    assert_matches_torch(_from_pretrained(tmp_path, gguf_file=path.name), cfg, params)
    if tensor_type == "F32":  # lossless: the permutation round-trips to the weights the file was made from
        model = LlamaForCausalLM(tiny_hf_config("llama"))
        model.load_state_dict({k: torch.from_numpy(v) for k, v in written.items()})
        assert_matches_torch(model, cfg, params)


def test_gguf_tied_and_linear_rope_scaling(tmp_path: Path) -> None:
    path = tmp_path / "tied.gguf"
    write_tiny_gguf(path, "Q8_0", tied=True, rope_scaling=("linear", 4.0))
    cfg, params = load_checkpoint(path)
    assert cfg.tie_embeddings and "lm_head/w" not in params
    assert dict(cfg.rope_scaling) == {"rope_type": "linear", "factor": 4.0}
    check_params(unflatten(params), cfg)


# ------------------------------------------------------------------------------------------ tokenizer


def test_save_tokenizer_from_hf_dir_and_gguf(tmp_path: Path, saved: Callable[..., Path]) -> None:
    hf_dir = save_tiny_tokenizer(_copy(saved("llama"), tmp_path / "hf"))
    write_tiny_gguf(tmp_path / "tiny.gguf", "F32")
    expected = AutoTokenizer.from_pretrained(hf_dir).encode("the cat")
    for source, out in ((hf_dir, tmp_path / "tok-hf"), (tmp_path / "tiny.gguf", tmp_path / "tok-gguf")):
        assert load_tokenizer(source).encode("the cat") == expected
        save_tokenizer(source, out)
        tokenizer = AutoTokenizer.from_pretrained(out)
        assert tokenizer.encode("the cat") == expected
        assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")


def test_save_tokenizer_without_tokenizer_files(tmp_path: Path, saved: Callable[..., Path]) -> None:
    with pytest.raises(CheckpointError, match="cannot load a tokenizer"):
        save_tokenizer(saved("llama"), tmp_path / "out")


# --------------------------------------------------------------------------------------------- errors


def test_unknown_model_type(tmp_path: Path, saved: Callable[..., Path]) -> None:
    directory = _copy(saved("llama"), tmp_path / "ckpt")
    hf = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**hf, "model_type": "rwkv"}))
    for call in (lambda: load_checkpoint(directory), lambda: load_config(directory),
                 lambda: config_from_hf({**hf, "model_type": "rwkv"})):
        with pytest.raises(UnsupportedModelError) as info:
            call()
        assert "rwkv" in str(info.value)
        assert all(t in str(info.value) for t in SUPPORTED_MODEL_TYPES)
    assert set(SUPPORTED_MODEL_TYPES) >= {"llama", "mistral", "qwen2", "opt"}


def test_missing_config_json(tmp_path: Path, saved: Callable[..., Path]) -> None:
    directory = _copy(saved("llama"), tmp_path / "ckpt")
    (directory / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(directory)


def test_missing_required_config_key(tmp_path: Path, saved: Callable[..., Path]) -> None:
    directory = _copy(saved("opt"), tmp_path / "ckpt")
    hf = json.loads((directory / "config.json").read_text())
    del hf["ffn_dim"]
    (directory / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=r"ffn_dim") as info:
        load_config(directory)
    assert str(directory / "config.json") in str(info.value)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere")


def test_missing_shard(tmp_path: Path, saved: Callable[..., Path]) -> None:
    directory = _copy(saved("llama", shards=True), tmp_path / "ckpt")
    shard = sorted(directory.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_checkpoint(directory)


def test_truncated_safetensors(tmp_path: Path, saved: Callable[..., Path]) -> None:
    directory = _copy(saved("llama"), tmp_path / "ckpt")
    file = directory / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated") as info:
        load_checkpoint(directory)
    assert str(file) in str(info.value)


def test_corrupt_safetensors_header(tmp_path: Path, saved: Callable[..., Path]) -> None:
    directory = _copy(saved("llama"), tmp_path / "ckpt")
    file = directory / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:12] = b"\xff\xfe{["
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(directory)


def _rewrite(file: Path, change: Callable[[dict[str, np.ndarray]], None]) -> None:
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_unmapped_extra_tensor(tmp_path: Path, saved: Callable[..., Path]) -> None:
    directory = _copy(saved("qwen2"), tmp_path / "ckpt")
    _rewrite(directory / "model.safetensors",
             lambda t: t.update({"model.layers.0.mlp.extra_proj.weight": np.zeros((4, 4), np.float32)}))
    with pytest.raises(CheckpointError, match=r"unmapped.*model\.layers\.0\.mlp\.extra_proj\.weight"):
        load_checkpoint(directory)


def test_layer_beyond_the_config(tmp_path: Path, saved: Callable[..., Path]) -> None:
    directory = _copy(saved("llama"), tmp_path / "ckpt")
    _rewrite(directory / "model.safetensors",
             lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros((96, 64), np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.up_proj\.weight.*layer 2.*2 layers"):
        load_checkpoint(directory)


def test_bias_the_config_does_not_declare(tmp_path: Path, saved: Callable[..., Path]) -> None:
    directory = _copy(saved("llama"), tmp_path / "ckpt")
    _rewrite(directory / "model.safetensors",
             lambda t: t.update({"model.layers.1.self_attn.q_proj.bias": np.zeros(64, np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.q_proj\.bias.*layers/attn/q/b"):
        load_checkpoint(directory)


@pytest.mark.parametrize("family, name", [("llama", "model.layers.1.mlp.up_proj.weight"),
                                          ("opt", "model.decoder.layers.1.fc2.bias"),
                                          ("opt350m", "model.decoder.project_in.weight")])
def test_missing_tensor(family: str, name: str, tmp_path: Path, saved: Callable[..., Path]) -> None:
    directory = _copy(saved(family), tmp_path / "ckpt")
    _rewrite(directory / "model.safetensors", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match="missing") as info:
        load_checkpoint(directory)
    assert name.removeprefix("model.") in str(info.value)


def test_wrong_shape(tmp_path: Path, saved: Callable[..., Path]) -> None:
    directory = _copy(saved("mistral"), tmp_path / "ckpt")
    _rewrite(directory / "model.safetensors",
             lambda t: t.update({"model.norm.weight": np.ones(63, np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*\(63,\)"):
        load_checkpoint(directory)


@pytest.mark.parametrize("value, counts", [(np.nan, "1 NaN and 0 infinite"), (-np.inf, "0 NaN and 1 infinite")])
def test_non_finite_weight(value: float, counts: str, tmp_path: Path, saved: Callable[..., Path]) -> None:
    """A NaN or inf weight converts and runs, and makes every output garbage: it is refused, by name."""
    directory = _copy(saved("llama", shards=True), tmp_path / "ckpt")
    shard = next(f for f in directory.glob("model-*.safetensors") if "model.norm.weight" in load_file(f))

    def poison(tensors: dict[str, np.ndarray]) -> None:
        tensors["model.norm.weight"][5] = value

    _rewrite(shard, poison)
    with pytest.raises(CheckpointError, match=rf"tensor model\.norm\.weight \(in .*{shard.name}\) has {counts}"):
        load_checkpoint(directory)


def test_duplicate_tensor_across_shards(tmp_path: Path, saved: Callable[..., Path]) -> None:
    directory = _copy(saved("llama", shards=True), tmp_path / "ckpt")
    first, second = sorted(directory.glob("model-*.safetensors"))[:2]
    name, value = next(iter(load_file(first).items()))
    _rewrite(second, lambda t: t.update({name: value}))
    with pytest.raises(CheckpointError, match="duplicate") as info:
        load_checkpoint(directory)
    assert all(s in str(info.value) for s in (name, first.name, second.name))


def test_gguf_of_another_architecture(tmp_path: Path) -> None:
    path = tmp_path / "other.gguf"
    write_tiny_gguf(path, "F32", architecture="mamba")
    for call in (load_checkpoint, load_config):
        with pytest.raises(UnsupportedModelError, match=r"'mamba'.*supported: .*llama"):
            call(path)


@pytest.mark.parametrize("refused", ["I32", "Q8_1"])
def test_gguf_tensor_type_that_cannot_be_dequantized(refused: str, tmp_path: Path) -> None:
    path = tmp_path / "refused.gguf"
    write_tiny_gguf(path, "Q8_0", tensor_types={"blk.1.ffn_up.weight": refused})
    with pytest.raises(CheckpointError, match=rf"blk\.1\.ffn_up\.weight.*{refused}"):
        load_checkpoint(path)


def test_gguf_rope_freqs_with_linear_scaling_and_yarn_without_its_length_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "freqs.gguf"
    write_tiny_gguf(path, "F32", rope_scaling=("linear", 2.0),
                    extra_tensors={"rope_freqs.weight": np.ones(8, np.float32)})
    with pytest.raises(CheckpointError, match="rope_freqs tensor together with rope scaling 'linear'"):
        load_checkpoint(path)
    path = tmp_path / "yarn.gguf"
    write_tiny_gguf(path, "F32", rope_scaling=("yarn", 4.0))
    with pytest.raises(CheckpointError, match="rope.scaling.original_context_length"):
        load_config(path)


def test_gguf_unmapped_tensor(tmp_path: Path) -> None:
    path = tmp_path / "extra.gguf"
    # A q norm (Qwen3, OLMo 2): a tensor no GGUF key map knows.
    write_tiny_gguf(path, "F32", extra_tensors={"blk.0.attn_q_norm.weight": np.ones(16, np.float32)})
    with pytest.raises(CheckpointError, match=r"unmapped.*blk\.0\.attn_q_norm\.weight"):
        load_checkpoint(path)


@pytest.mark.parametrize("keep_fraction", [0.5, 0.01])
def test_truncated_gguf(keep_fraction: float, tmp_path: Path) -> None:
    path = tmp_path / "cut.gguf"
    write_tiny_gguf(path, "Q4_0")
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep_fraction)])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_every_declared_weight_is_produced(saved: Callable[..., Path]) -> None:
    """The result has exactly the declared names and shapes (opt-350m: project_in/out, no final norm)."""
    cfg, params = load_checkpoint(saved("opt350m"))
    specs = flatten(param_specs(cfg))
    assert {n: s.shape for n, s in specs.items()} == {n: v.shape for n, v in params.items()}
    assert "project_in" in params and "final_norm/scale" not in params
