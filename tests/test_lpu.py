"""The LPU performance model: published points, invariants, bad input and `hdex estimate`."""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import pytest
from PIL import Image

from hdex_jax.config import ModelConfig
from hdex_jax.layout import padded_config
from hdex_jax.lpu import ASIC, FPGA_U55C, PRESETS, estimate, plot_scaling, scaling
from hdex_jax.lpu import calibration
from hdex_jax.lpu.formats import Storage
from hdex_jax.lpu.latency import traffic
from hdex_jax.cli import main
from hdex_jax.params import flatten, param_specs, total_bytes
from hdex_jax.sharding import LOGICAL_RULES

# The published Hugging Face config.json files (facebook/opt-1.3b, facebook/opt-66b,
# HuggingFaceTB/SmolLM2-135M-Instruct), as the tests feed them to `hdex estimate`.
OPT_COMMON = {
    "_name_or_path": "facebook/opt", "activation_dropout": 0.0, "activation_function": "relu",
    "architectures": ["OPTForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 2, "do_layer_norm_before": True,
    "dropout": 0.1, "enable_bias": True, "eos_token_id": 2, "init_std": 0.02, "layer_norm_elementwise_affine": True,
    "layerdrop": 0.0, "max_position_embeddings": 2048, "model_type": "opt", "pad_token_id": 1,
    "prefix": "</s>", "tie_word_embeddings": True, "torch_dtype": "float16", "use_cache": True,
    "vocab_size": 50272,
}
OPT_1_3B_JSON = {**OPT_COMMON, "hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 32,
                 "ffn_dim": 8192, "word_embed_proj_dim": 2048}
OPT_66B_JSON = {**OPT_COMMON, "hidden_size": 9216, "num_hidden_layers": 64, "num_attention_heads": 72,
                "ffn_dim": 36864, "word_embed_proj_dim": 9216}
SMOLLM2_JSON = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664,
    "intermediate_size": 1536, "max_position_embeddings": 8192, "model_type": "llama", "num_attention_heads": 9,
    "num_hidden_layers": 30, "num_key_value_heads": 3, "pad_token_id": 2, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 100000, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 49152,
}


def opt(hidden: int, layers: int, heads: int, ffn: int) -> ModelConfig:
    """An OPT model built field by field, independently of the converters."""
    return ModelConfig(
        model_type="opt", vocab_size=50272, hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=heads, head_dim=hidden // heads, intermediate_size=ffn, max_position_embeddings=2048,
        embed_dim=hidden, norm="layernorm", norm_eps=1e-5, positions="learned", position_offset=2,
        activation="relu", gated_mlp=False, qkv_bias=True, o_bias=True, mlp_bias=True, tie_embeddings=True)


OPT_1_3B = opt(2048, 24, 32, 8192)
OPT_66B = opt(9216, 64, 72, 36864)
SMOLLM2 = ModelConfig(
    model_type="llama", vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
    head_dim=64, intermediate_size=1536, max_position_embeddings=8192, embed_dim=576, norm_eps=1e-5,
    rope_theta=100000.0, tie_embeddings=True)
# An untied, projected, sliding-window GQA model exercises the branches the three above do not.
ODD = ModelConfig(
    model_type="llama", vocab_size=1001, hidden_size=96, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=16,
    intermediate_size=200, max_position_embeddings=512, embed_dim=64, sliding_window=100, qkv_bias=True)
DIRECT = {"facebook/opt-1.3b": OPT_1_3B, "facebook/opt-66b": OPT_66B}
MODELS = [OPT_1_3B, OPT_66B, SMOLLM2, ODD]


def model_id(cfg: ModelConfig) -> str:
    return f"{cfg.model_type}-{cfg.hidden_size}"


# --- The published points, reproduced within 10% ---

@pytest.mark.parametrize("row", calibration.calibration_table(DIRECT), ids=lambda row: row.figure)
def test_published_point_within_ten_percent(row: calibration.Row) -> None:
    assert abs(row.error) <= 0.10, f"{row.figure}: published {row.published}, estimated {row.estimated:.4g}"


def test_published_points_from_converted_configs() -> None:
    """The converters turn the published config.json into the same models, so the table is the same."""
    converted = calibration.opt_configs()
    for name, cfg in DIRECT.items():
        assert dataclasses.replace(converted[name], bos_token_id=None, eos_token_ids=(), pad_token_id=None) == cfg
    assert calibration.calibration_table(converted) == calibration.calibration_table(DIRECT)
    for name, hf in (("facebook/opt-1.3b", OPT_1_3B_JSON), ("facebook/opt-66b", OPT_66B_JSON)):
        assert {k: hf[k] for k in calibration.OPT_HF_CONFIGS[name]} == calibration.OPT_HF_CONFIGS[name]


def test_calibration_context_is_the_mean_of_the_workload() -> None:
    assert calibration.PROMPT_LEN + calibration.OUTPUT_LEN == OPT_1_3B.max_position_embeddings
    contexts = range(calibration.PROMPT_LEN, calibration.PROMPT_LEN + calibration.OUTPUT_LEN)
    assert calibration.CALIBRATION_CONTEXT == sum(contexts) // len(contexts)


def test_asic_preset_is_the_fit_rounded() -> None:
    fitted = calibration.fit_bandwidth_and_latency(DIRECT)
    assert fitted.memory_bandwidth_gbs == pytest.approx(ASIC.memory_bandwidth_gbs, rel=0.01)
    assert fitted.op_latency_cycles == pytest.approx(ASIC.op_latency_cycles, rel=0.01)
    for point in calibration.LATENCY_POINTS:
        ms = estimate(DIRECT[point.model], point.num_device, calibration.CALIBRATION_CONTEXT, preset=fitted)
        assert ms.ms_per_token == pytest.approx(point.ms_per_token, rel=1e-3)


def test_utilization_never_exceeds_the_streaming_efficiency() -> None:
    for cfg in MODELS:
        for n in (1, 2, 8):
            assert 0 < estimate(cfg, n, 100).bandwidth_utilization <= ASIC.stream_efficiency


# --- Invariants ---

@pytest.mark.parametrize("cfg", MODELS, ids=model_id)
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_latency_falls_as_bandwidth_rises(cfg: ModelConfig, preset: str) -> None:
    hw = PRESETS[preset]
    for n in (1, 2, 4):
        times = [estimate(cfg, n, 300, preset=dataclasses.replace(hw, memory_bandwidth_gbs=hw.memory_bandwidth_gbs
                                                                  * factor)).ms_per_token
                 for factor in (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)]
        # Strictly while streaming binds; once the MACs bind (the FPGA's are sized for its own 460 GB/s),
        # more bandwidth no longer helps but never hurts.
        assert all(a > b for a, b in zip(times[:4], times[1:4])), times
        assert all(a >= b for a, b in zip(times, times[1:])), times


@pytest.mark.parametrize("cfg", MODELS, ids=model_id)
def test_no_sync_on_one_device(cfg: ModelConfig) -> None:
    est = estimate(cfg, 1, 200, batch=4)
    assert est.syncs == ()
    assert est.stages["esl_sync"] == est.sync_exposed_ms == est.sync_overlapped_ms == 0
    assert est.baseline_ms_per_token == est.ms_per_token


@pytest.mark.parametrize("cfg", MODELS, ids=model_id)
@pytest.mark.parametrize("batch", [1, 64])
def test_doubling_devices_never_more_than_halves_latency(cfg: ModelConfig, batch: int) -> None:
    for n in (1, 2, 3, 4):
        for context in (0, 200):
            for preset in PRESETS:
                one = estimate(cfg, n, context, preset=preset, batch=batch)
                two = estimate(cfg, 2 * n, context, preset=preset, batch=batch)
                assert two.ms_per_token >= one.ms_per_token / 2
                assert two.baseline_ms_per_token >= one.baseline_ms_per_token / 2


@pytest.mark.parametrize("cfg", MODELS, ids=model_id)
@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_bytes_counted_are_the_declared_weight_sizes(cfg: ModelConfig, n: int) -> None:
    est = estimate(cfg, n, 10)
    padded = dataclasses.replace(padded_config(cfg, n), dtype="float16")
    assert est.weight_bytes == total_bytes(padded)
    specs = flatten(param_specs(padded))
    # One device holds a 1/n share (rounded up) of every weight with a split axis and all of the others.
    share = 0
    for spec in specs.values():
        split = [i for i, a in enumerate(spec.axes) if LOGICAL_RULES.get(a)]
        rows = spec.shape[split[0]] if split else 1
        share += spec.nbytes // rows * math.ceil(rows / n)
    assert est.device_weight_bytes == share
    if n == 1:
        assert est.device_weight_bytes == total_bytes(dataclasses.replace(cfg, dtype="float16"))
        # A token streams every weight once, except the lookup tables of which it reads one row each
        # (the tied embedding is streamed whole as the LM head).
        lookups = {name: specs[name] for name in ("embed", "pos_embed") if name in specs}
        unread = sum(s.nbytes - s.nbytes // s.shape[0] for s in lookups.values())
        if cfg.tie_embeddings:
            unread -= lookups["embed"].nbytes
        assert est.weight_stream_bytes == est.weight_bytes - unread


def test_sync_counts_come_from_the_declarations() -> None:
    est = estimate(OPT_66B, 2, 0)
    by_name = {(s.name, s.kind): s for s in est.syncs}
    # Two row-parallel matrices per layer (attention out, MLP down), the vocab-parallel embedding lookup and
    # the gather of the vocab-parallel logits.
    assert set(by_name) == {("layers/attn/o/w", "all-reduce"), ("layers/mlp/down/w", "all-reduce"),
                            ("embed", "all-reduce"), ("embed", "all-gather")}
    assert by_name["layers/attn/o/w", "all-reduce"].count == OPT_66B.num_layers
    assert by_name["layers/mlp/down/w", "all-reduce"].payload_bytes == OPT_66B.hidden_size * 2
    assert by_name["embed", "all-gather"].payload_bytes == OPT_66B.vocab_size * 2
    untied = {(s.name, s.kind) for s in estimate(ODD, 4, 0).syncs}
    gathers = [name for name, kind in untied if kind == "all-gather"]
    assert len(gathers) == 1 and gathers[0].startswith("lm_head")


@pytest.mark.parametrize("cfg", MODELS, ids=model_id)
def test_stages_add_up_and_esl_beats_the_baseline(cfg: ModelConfig) -> None:
    for n in (2, 4, 8):
        est = estimate(cfg, n, 50, batch=2)
        assert set(est.stages) == {"weights", "kv_cache", "vector", "pipeline", "esl_sync"}
        assert est.ms_per_token == pytest.approx(sum(est.stages.values()))
        assert est.stages["esl_sync"] == pytest.approx(est.sync_exposed_ms) and est.sync_exposed_ms > 0
        assert all(s.overlapped_ms >= 0 and s.exposed_ms > 0 for s in est.syncs)
        assert est.baseline_ms_per_token > est.ms_per_token


def test_kv_reads_grow_with_context_and_stop_at_the_window() -> None:
    kv = [estimate(SMOLLM2, 2, c).kv_stream_bytes for c in (0, 100, 200)]
    assert kv[2] - kv[1] == kv[1] - kv[0] > 0
    windowed = [estimate(ODD, 1, c).kv_stream_bytes for c in (98, 99, 300)]
    assert windowed[0] < windowed[1] == windowed[2]


def test_batch_shares_the_weight_stream() -> None:
    one, many = estimate(OPT_1_3B, 1, 100), estimate(OPT_1_3B, 1, 100, batch=8)
    assert many.weight_stream_bytes < 1.01 * one.weight_stream_bytes
    assert many.kv_stream_bytes == 8 * one.kv_stream_bytes
    assert many.tokens_per_s > one.tokens_per_s
    # The matrix engine is sized to keep up with the stream of one row: eight rows make it the bound.
    assert many.stages["weights"] > 4 * one.stages["weights"]


def test_memory_capacity_is_reported() -> None:
    assert not estimate(OPT_66B, 1, 0).fits_in_memory and estimate(OPT_66B, 2, 0).fits_in_memory
    assert not estimate(OPT_66B, 2, 0, preset="fpga-u55c").fits_in_memory


# --- Presets ---

def test_presets_are_plain_data_a_user_can_copy_and_change() -> None:
    assert PRESETS == {"asic": ASIC, "fpga-u55c": FPGA_U55C}
    assert FPGA_U55C.memory_bandwidth_gbs == 460.0 and FPGA_U55C.clock_mhz == 220.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        ASIC.memory_bandwidth_gbs = 1.0  # type: ignore[misc]
    faster = dataclasses.replace(ASIC, name="asic-hbm3e", memory_bandwidth_gbs=4800.0)
    assert estimate(OPT_66B, 2, 0, preset=faster).preset == "asic-hbm3e"
    assert estimate(OPT_66B, 2, 0, preset=faster).ms_per_token < estimate(OPT_66B, 2, 0).ms_per_token
    assert estimate(OPT_1_3B, 1, 0, preset="fpga-u55c").ms_per_token > estimate(OPT_1_3B, 1, 0).ms_per_token
    with pytest.raises(ValueError, match="stream_efficiency"):
        dataclasses.replace(ASIC, stream_efficiency=1.5)
    with pytest.raises(ValueError, match="clock_mhz"):
        dataclasses.replace(ASIC, clock_mhz=0)


# --- Bad input ---

def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="unknown LPU preset 'tpu'.*asic, fpga-u55c"):
        estimate(OPT_1_3B, 1, 0, preset="tpu")


@pytest.mark.parametrize("n, error", [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_device_count(n: object, error: type) -> None:
    with pytest.raises(error, match="num_device"):
        estimate(OPT_1_3B, n, 0)  # type: ignore[arg-type]


def test_bad_context_batch_and_dtype() -> None:
    with pytest.raises(ValueError, match="context_len must be an integer >= 0"):
        estimate(OPT_1_3B, 1, -1)
    with pytest.raises(ValueError, match="max_position_embeddings=2048"):
        estimate(OPT_1_3B, 1, 2048)
    with pytest.raises(ValueError, match="batch"):
        estimate(OPT_1_3B, 1, 0, batch=0)
    with pytest.raises(ValueError, match="dtype"):
        estimate(OPT_1_3B, 1, 0, dtype="float13")


# --- hdex estimate ---

def write_config(tmp_path, name: str, hf: dict) -> str:
    directory = tmp_path / name
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(hf))
    return str(directory / "config.json")


@pytest.mark.parametrize("name,hf", [("opt-1.3b", OPT_1_3B_JSON), ("opt-66b", OPT_66B_JSON),
                                     ("smollm2", SMOLLM2_JSON)])
def test_cli_from_config_json_alone(tmp_path, capsys, name: str, hf: dict) -> None:
    path = write_config(tmp_path, name, hf)
    csv_path, png_path = tmp_path / "scaling.csv", tmp_path / "scaling.png"
    assert main(["estimate", path, "--devices", "1,2,4,8", "--csv", str(csv_path), "--plot", str(png_path)]) == 0
    out = capsys.readouterr().out
    for header in ("ms/token", "tokens/s", "speedup", "BW util", "ESL exposed ms", "sync not overlapped ms/token"):
        assert header in out
    with open(csv_path) as f:
        records = list(csv.DictReader(f))
    assert [int(r["devices"]) for r in records] == [1, 2, 4, 8]
    assert float(records[0]["esl_exposed_ms"]) == 0 and float(records[-1]["esl_exposed_ms"]) > 0
    assert [float(r["ideal_speedup"]) for r in records] == [1, 2, 4, 8]
    with Image.open(png_path) as image:
        assert image.format == "PNG" and image.size[0] > 300


def test_cli_published_numbers_in_the_table(tmp_path, capsys) -> None:
    path = write_config(tmp_path, "opt-66b", OPT_66B_JSON)
    assert main(["estimate", path, "--devices", "2", "--preset", "asic"]) == 0
    row = capsys.readouterr().out.splitlines()[-1].split()
    assert row[0] == "2" and float(row[1]) == pytest.approx(20.9, rel=0.1)


def test_cli_compiled_model(tmp_path, monkeypatch, capsys) -> None:
    """A compiled model's hdex_config.json under $HDEX_HOME is enough (the name is the default model's)."""
    monkeypatch.setenv("HDEX_HOME", str(tmp_path))
    ckpt = tmp_path / "hub" / "HuggingFaceTB" / "SmolLM2-135M-Instruct" / "ckpt"
    ckpt.mkdir(parents=True)
    SMOLLM2.save(ckpt)
    assert main(["estimate", "SmolLM2-135M-Instruct", "--devices", "1,2", "--context", "4000",
                 "--preset", "fpga-u55c"]) == 0
    out = capsys.readouterr().out
    assert "preset fpga-u55c" in out and "context 4000" in out


def test_plot_has_the_three_curves(tmp_path) -> None:
    fig = plot_scaling(scaling(OPT_66B, [2, 4, 8], 100), tmp_path / "p.png")
    lines = fig.axes[0].get_lines()
    assert len(lines) == 3
    labels = [line.get_label() for line in lines]
    assert any("ideal" in label for label in labels) and any("not overlapped" in label for label in labels)
    ideal = lines[0].get_ydata()
    assert list(ideal) == [1, 2, 4]
    assert all(1 <= y <= i for y, i in zip(lines[1].get_ydata(), ideal))
    assert (tmp_path / "p.png").stat().st_size > 0


@pytest.mark.parametrize("argv,message", [
    (["--preset", "tpu"], "unknown LPU preset 'tpu'"),
    (["--devices", "0,2"], "--devices must be an integer >= 1, got 0"),
    (["--context", "-5"], "--context must be an integer >= 0, got -5"),
])
def test_cli_bad_input(tmp_path, capsys, argv: list[str], message: str) -> None:
    path = write_config(tmp_path, "opt-1.3b", OPT_1_3B_JSON)
    assert main(["estimate", path, *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_unsupported_family(tmp_path, capsys) -> None:
    path = write_config(tmp_path, "bert", {"model_type": "bert", "hidden_size": 768, "num_hidden_layers": 12})
    assert main(["estimate", path]) == 2
    err = capsys.readouterr().err
    assert "bert" in err and "opt" in err  # names the family and lists the supported ones


def test_cli_unknown_model_says_what_it_looked_for(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HDEX_HOME", str(tmp_path))
    assert main(["estimate", "nobody/no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "hdex_config.json" in err and "config.json" in err


def test_cli_bad_device_list(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["estimate", "x", "--devices", "two"])
    assert "comma-separated integers" in capsys.readouterr().err


# --- Storage formats counted by their bits ---

def quant_array_bytes(spec, fmt: str) -> int:
    """Bytes of `spec` as the datapath lays a QuantArray out (hdex_jax.quant.field_shapes): values, scales, offsets."""
    from hdex_jax.quant import FORMATS, field_shapes

    outputs = 2 if spec.axes[-1] == "head_dim" else 1
    inputs = tuple(i for i, a in enumerate(spec.axes[:len(spec.axes) - outputs]) if a not in ("layers", "experts"))
    values, scale = field_shapes(spec.shape, inputs[-1], inputs, fmt)
    return math.prod(values) + math.prod(scale) * 2 * (1 + FORMATS[fmt].affine)


@pytest.mark.parametrize("fmt", ["int8", "int4", "q8_0", "q4_0", "q4_1"])
def test_quantized_matrix_bytes_are_the_quant_layout(fmt: str) -> None:
    from hdex_jax.lpu.formats import Storage

    specs = flatten(param_specs(OPT_1_3B))
    for name in ("layers/attn/q/w", "layers/attn/o/w", "layers/mlp/up/w", "layers/mlp/down/w", "embed"):
        assert Storage(quantize=fmt).nbytes(specs[name]) == quant_array_bytes(specs[name], fmt), name
    # Norms and biases stay float16.
    assert Storage(quantize=fmt).nbytes(specs["layers/ln1/scale"], matrix=False) == 2 * OPT_1_3B.num_layers * 2048


def test_int4_below_int8_below_float16() -> None:
    est = {f: estimate(OPT_66B, 2, 100, dtype=f) for f in ("float16", "int8", "int4", "q4_0", "q8_0")}
    assert est["int4"].weight_bytes < est["int8"].weight_bytes < est["float16"].weight_bytes
    assert est["q4_0"].weight_bytes < est["int4"].weight_bytes < est["q8_0"].weight_bytes
    matrices = sum(math.prod(s.shape) for n, s in flatten(param_specs(OPT_66B)).items()
                   if not n.endswith(("scale", "bias", "/b")))  # weights in the matrices
    # int4: half a byte per weight plus a float16 scale and min per group of 32; int8: one byte plus scales.
    others = est["float16"].weight_bytes - 2 * matrices
    assert est["int4"].weight_bytes - others == pytest.approx(matrices * (0.5 + 4 / 32), rel=1e-6)
    assert est["int8"].weight_bytes - others == pytest.approx(matrices, rel=1e-3)
    # The KV cache and activations stay float16: the same KV traffic.
    assert est["int4"].kv_stream_bytes == est["float16"].kv_stream_bytes
    assert estimate(OPT_66B, 2, 100, quantize="int4") == est["int4"]
    assert estimate(OPT_66B, 2, 100, dtype="float8").weight_bytes == est["float16"].weight_bytes // 2
    # The matrix engine is balanced to the float16 stream: int8 halves the stream and the MACs then bind, so
    # int4 is no faster on it; a matrix engine twice as wide lets int4 gain too.
    assert est["int4"].ms_per_token == est["int8"].ms_per_token < est["float16"].ms_per_token
    wide = dataclasses.replace(ASIC, macs_per_cycle=4 * ASIC.macs_per_cycle)
    assert (estimate(OPT_66B, 2, 100, preset=wide, dtype="int4").ms_per_token
            < estimate(OPT_66B, 2, 100, preset=wide, dtype="int8").ms_per_token)


def test_bad_quantize() -> None:
    with pytest.raises(ValueError, match="quantize must be one of q8_0, q4_0, q4_1, int8, int4"):
        estimate(OPT_1_3B, 1, 0, quantize="int3")
    with pytest.raises(ValueError, match="disagree"):
        estimate(OPT_1_3B, 1, 0, dtype="int4", quantize="int8")


# --- Per-layer windows, as the datapath applies them ---

def test_windows_per_layer_come_from_cfg_window() -> None:
    from converters import config_from_hf

    qwen2 = config_from_hf({
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "use_sliding_window": True, "sliding_window": 50,
        "max_window_layers": 2, "tie_word_embeddings": False})
    assert [qwen2.window(i) for i in range(4)] == [None, None, 50, 50]
    uniform = dataclasses.replace(qwen2, sliding_layers=())
    for context in (10, 49, 300):
        per_layer = sum(min(context + 1, qwen2.window(i) or context + 1) for i in range(4))
        entry = 2 * qwen2.num_kv_heads * qwen2.head_dim * 2  # K and V of one position of one layer, float16
        est = estimate(qwen2, 1, context)
        assert est.kv_stream_bytes == entry * (per_layer + 4)  # read the attended ones, write the new one
        assert est.device_kv_cache_bytes == entry * per_layer
        if context >= 50:
            assert est.kv_stream_bytes < estimate(dataclasses.replace(qwen2, sliding_window=None), 1, context).kv_stream_bytes
            assert est.kv_stream_bytes > estimate(uniform, 1, context).kv_stream_bytes  # not every layer windowed


# --- Small-model scaling: what makes OPT-1.3B slower on 8 devices than on 4 ---

def test_small_model_slowdown_is_the_esl_hop_latency() -> None:
    four, eight = estimate(OPT_1_3B, 4, 1039), estimate(OPT_1_3B, 8, 1039)
    assert eight.ms_per_token > four.ms_per_token
    assert eight.stages["pipeline"] == four.stages["pipeline"]  # the instruction chain does not change with N
    gain = sum(four.stages[s] - eight.stages[s] for s in ("weights", "kv_cache", "vector"))
    loss = eight.stages["esl_sync"] - four.stages["esl_sync"]
    assert loss > gain > 0
    # Exposed ESL time is the hop latency: (N - 1) hops per sync, 2 syncs per layer.
    hops = 1e-3 * ASIC.esl_hop_latency_us * (2 * OPT_1_3B.num_layers + 2)
    assert loss == pytest.approx(hops * (7 - 3), rel=0.05)
    no_hops = dataclasses.replace(ASIC, esl_hop_latency_us=1e-6)
    assert estimate(OPT_1_3B, 8, 1039, preset=no_hops).ms_per_token < estimate(OPT_1_3B, 4, 1039, preset=no_hops).ms_per_token


# --- The GPU model ---

def test_gpu_software_is_the_fit_rounded_and_reproduces_its_points() -> None:
    from hdex_jax.lpu.presets import GPU_SOFTWARE

    fitted = calibration.fit_gpu()
    for key, value in fitted.items():
        assert value == pytest.approx(GPU_SOFTWARE[key], rel=0.02), key
    for row in calibration.gpu_table()[:len(calibration.GPU_POINTS)]:
        assert abs(row.error) <= 0.04, row


def test_gpu_step_from_the_declarations() -> None:
    from hdex_jax.lpu import H100_SXM, gpu_estimate
    from hdex_jax.lpu.latency import traffic
    from hdex_jax.lpu.formats import Storage

    one = gpu_estimate(OPT_66B, 1, 100)
    assert one.stages["allreduce"] == 0
    two = gpu_estimate(OPT_66B, 2, 100)
    assert two.ms_per_token == pytest.approx(sum(two.stages.values()))
    # Every sync stalls compute: 2 all-reduces of [1, hidden] per layer, the embedding's, the logits' gather.
    hidden, vocab = OPT_66B.hidden_size * 2, OPT_66B.vocab_size * 2
    link, alpha = H100_SXM.link_gbs * 1e9, H100_SXM.allreduce_latency_us * 1e-6
    expected = (2 * OPT_66B.num_layers + 1) * (alpha + hidden / link) + alpha + vocab / 2 / link
    assert two.stages["allreduce"] == pytest.approx(1e3 * expected, rel=1e-3)
    t = traffic(OPT_66B, 2, 100, 1, Storage())
    assert two.kernels == t.ops + 2 * OPT_66B.num_layers + 2
    assert two.stages["kernels"] == pytest.approx(two.kernels * H100_SXM.kernel_overhead_us * 1e-3)
    assert two.stages["weights"] == pytest.approx(
        1e3 * t.weight_bytes / (H100_SXM.memory_bandwidth_gbs * 1e9 * H100_SXM.stream_efficiency))


def test_gpu_achieved_bandwidth_grows_with_matrix_size() -> None:
    from hdex_jax.lpu import H100_SXM, achieved_bandwidth_gbs

    sizes = [2 ** k for k in range(14, 32, 2)]
    rates = [achieved_bandwidth_gbs("h100", s) for s in sizes]
    assert all(a < b for a, b in zip(rates, rates[1:]))
    assert rates[-1] == pytest.approx(H100_SXM.memory_bandwidth_gbs * H100_SXM.stream_efficiency, rel=0.01)
    assert rates[0] < 0.01 * rates[-1]  # a 16 KiB kernel is all overhead


def test_gpu_presets_and_bad_gpu() -> None:
    from hdex_jax.lpu import GPU_PRESETS, gpu_estimate

    assert set(GPU_PRESETS) == {"h100", "l4", "a100"}
    assert gpu_estimate(OPT_1_3B, 1, 100, gpu="l4").ms_per_token > gpu_estimate(OPT_1_3B, 1, 100).ms_per_token
    assert not gpu_estimate(OPT_66B, 2, 100, gpu="l4").fits_in_memory
    with pytest.raises(ValueError, match="unknown GPU preset 'v100'"):
        gpu_estimate(OPT_1_3B, 1, 0, gpu="v100")


# --- Energy ---

def test_energy_arithmetic() -> None:
    from hdex_jax.lpu import H100_SXM, gpu_estimate
    from hdex_jax.lpu.energy import HOST_W_PER_DEVICE, PSU_EFFICIENCY

    for n in (1, 2, 8):
        lpu = estimate(OPT_66B, n, 1039, batch=2)
        bits_per_s = 8 * lpu.streamed_bytes / (lpu.ms_per_token * 1e-3)
        card = ASIC.core_power_w + ASIC.board_static_w + ASIC.memory_pj_per_bit * 1e-12 * bits_per_s
        assert lpu.power_w == pytest.approx(n * (card + HOST_W_PER_DEVICE) / PSU_EFFICIENCY)
        assert lpu.joules_per_token == pytest.approx(lpu.power_w * lpu.ms_per_token * 1e-3 / 2)
        assert lpu.tokens_per_joule == pytest.approx(1 / lpu.joules_per_token)
        gpu = gpu_estimate(OPT_66B, n, 1039)
        board = H100_SXM.idle_power_w + (H100_SXM.board_power_w - H100_SXM.idle_power_w) * gpu.bandwidth_utilization
        assert gpu.power_w == pytest.approx(n * (board + HOST_W_PER_DEVICE) / PSU_EFFICIENCY)
        assert H100_SXM.idle_power_w < board < H100_SXM.board_power_w


# --- The prompt pass and the hybrid ---

def matrix_elements(cfg: ModelConfig) -> int:
    """Weights a token multiplies: every matrix, the tied embedding once as the LM head, no lookup row."""
    specs = flatten(param_specs(cfg))
    skip = {"pos_embed"} | (set() if cfg.tie_embeddings else {"embed"})
    return sum(math.prod(s.shape) for n, s in specs.items()
               if n not in skip and not n.endswith(("scale", "bias", "/b")))


def test_lpu_prefill_is_bound_by_the_matrix_engine() -> None:
    from hdex_jax.lpu import lpu_prefill

    p = lpu_prefill(OPT_1_3B, 1, 512)
    rate = ASIC.macs_per_cycle * ASIC.clock_mhz * 1e6
    assert p.stages["weights"] == pytest.approx(1e3 * 512 * matrix_elements(OPT_1_3B) / rate)
    # Causal attention: position i sees i + 1 positions, scores and values over every head.
    pairs = OPT_1_3B.num_layers * 512 * 513 // 2
    assert p.stages["attention"] == pytest.approx(1e3 * 2 * OPT_1_3B.hidden_size * pairs / rate)
    assert p.ms == pytest.approx(sum(p.stages.values()))
    assert p.kv_cache_bytes == 2 * OPT_1_3B.num_layers * OPT_1_3B.hidden_size * 512 * 2
    assert lpu_prefill(OPT_1_3B, 4, 512).ms < p.ms / 3


def test_gpu_prefill_short_prompt_streams_long_prompt_computes() -> None:
    from hdex_jax.lpu import H100_SXM, gpu_estimate, gpu_prefill

    one = gpu_prefill(OPT_1_3B, 1, 1)
    assert one.stages["weights"] == pytest.approx(gpu_estimate(OPT_1_3B, 1, 0).stages["weights"])
    long = gpu_prefill(OPT_1_3B, 1, 2000)
    flops = H100_SXM.peak_tflops * 1e12 * H100_SXM.prefill_mfu
    assert long.stages["weights"] == pytest.approx(1e3 * 2 * 2000 * matrix_elements(OPT_1_3B) / flops)


def test_hybrid_end_to_end_arithmetic() -> None:
    from hdex_jax.lpu import H100_SXM, end_to_end, gpu_prefill

    e2e = end_to_end(OPT_66B, 512, 128, {"gpu": 2, "lpu": 2})
    prefill = gpu_prefill(OPT_66B, 2, 512)
    transfer = prefill.kv_cache_bytes / (2 * min(H100_SXM.host_link_gbs, ASIC.host_link_gbs) * 1e9)
    step = estimate(OPT_66B, 2, 512 + 63).ms_per_token  # mean context of the 127 decode steps
    assert e2e.ttft_ms == prefill.ms
    assert e2e.transfer_ms == pytest.approx(1e3 * transfer)
    assert e2e.decode_ms == pytest.approx(127 * step)
    assert e2e.total_ms == pytest.approx(prefill.ms + 1e3 * transfer + 127 * step)
    lpu_only = end_to_end(OPT_66B, 512, 128, {"lpu": 2})
    assert lpu_only.transfer_ms == 0 and lpu_only.decode_ms == e2e.decode_ms
    assert e2e.total_ms < lpu_only.total_ms  # the LPU's matrix engine is sized for decode, not for prompts
    with pytest.raises(ValueError, match="max_position_embeddings=2048"):
        end_to_end(OPT_66B, 2000, 100, {"lpu": 2})


@pytest.mark.parametrize("device_map", [None, {"lpu": 2}, {"gpu": 1, "lpu": 2}, {"gpu": 0, "lpu": 1},
                                        {"lpu": 0}, {"gpu": -1, "lpu": 1}, {"cpu": 1}, {"gpu": 1}, [("lpu", 1)]])
def test_estimate_and_from_pretrained_take_the_same_device_map(device_map) -> None:
    from hdex_jax.lpu.prefill import parse_placement
    from hdex_jax.transformers.modeling import parse_device_map

    try:
        expected = parse_device_map(device_map)
    except (TypeError, ValueError) as error:
        with pytest.raises(type(error)) as ours:
            parse_placement(device_map)
        assert str(ours.value).split(";")[0].split(" got")[0] in str(error)
    else:
        assert parse_placement(device_map) == expected


# --- hdex estimate --compare and the Python API ---

def test_compare_is_the_two_models_side_by_side() -> None:
    from hdex_jax.lpu import compare, gpu_estimate

    rows = compare(OPT_66B, [1, 2], 1039)
    for row in rows:
        assert row.lpu == estimate(OPT_66B, row.num_device, 1039)
        assert set(row.gpus) == {"h100", "l4"}
        for name, g in row.gpus.items():
            assert g == gpu_estimate(OPT_66B, row.num_device, 1039, gpu=name)
            assert row.speedup(name) == g.ms_per_token / row.lpu.ms_per_token
            assert row.efficiency(name) == pytest.approx(g.joules_per_token / row.lpu.joules_per_token)


def test_cli_compare_prints_what_the_api_returns(tmp_path, capsys) -> None:
    from hdex_jax.lpu import compare

    path = write_config(tmp_path, "opt-66b", OPT_66B_JSON)
    png = tmp_path / "cmp.png"
    assert main(["estimate", path, "--devices", "1,2,4,8", "--compare", "h100,l4", "--plot", str(png),
                 "--prompt", "512", "--output", "128"]) == 0
    out = capsys.readouterr().out
    lines = {tuple(line.split()[:2]): line.split() for line in out.splitlines() if line.split()[:2] and
             line.split()[1] in ("asic", "h100", "l4") and line.split()[0].isdigit()}
    for row in compare(OPT_66B, [1, 2, 4, 8], 1039):
        lpu = lines[str(row.num_device), "asic"]
        assert float(lpu[2]) == pytest.approx(row.lpu.ms_per_token, abs=1e-3)
        assert float(lpu[4]) == pytest.approx(row.lpu.joules_per_token, rel=1e-3)
        for name in ("h100", "l4"):
            gpu = lines[str(row.num_device), name]
            assert float(gpu[2]) == pytest.approx(row.gpus[name].ms_per_token, abs=1e-3)
            assert float(gpu[-3].rstrip("x")) == pytest.approx(row.speedup(name), abs=0.005)
            assert float(gpu[-2].rstrip("x")) == pytest.approx(row.efficiency(name), abs=0.005)
    assert "gpu:2,lpu:2" in out and "TTFT ms" in out
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 600


def test_cli_quantize_and_dtype_name_the_same_format(tmp_path, capsys) -> None:
    path = write_config(tmp_path, "opt-1.3b", OPT_1_3B_JSON)
    assert main(["estimate", path, "--devices", "1", "--quantize", "int4"]) == 0
    by_flag = capsys.readouterr().out
    assert main(["estimate", path, "--devices", "1", "--dtype", "int4"]) == 0
    assert capsys.readouterr().out == by_flag and "GB of int4 weights" in by_flag
    assert main(["estimate", path, "--compare", "v100"]) == 2
    assert "unknown GPU preset 'v100'" in capsys.readouterr().err
    assert main(["estimate", path, "--prompt", "5"]) == 2
    assert "--prompt and --output go together" in capsys.readouterr().err


# --- The fidelity table of docs/lpu_performance_model.md ---

def documented_fidelity() -> list[list[str]]:
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "lpu_performance_model.md").read_text()
    table = doc.split("<!-- fidelity table -->")[1]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in table.strip().splitlines()[2:] if line.startswith("|")]


def test_fidelity_table_fitted_points_pinned_held_out_errors_no_worse() -> None:
    rows = calibration.fidelity_table(DIRECT)
    documented = documented_fidelity()
    assert [d[0] for d in documented] == [r.figure for r in rows]
    for doc, row in zip(documented, rows):
        assert float(doc[3]) == pytest.approx(row.published, rel=1e-3), row.figure
        assert doc[2] == ("fitted" if row.fitted else "**held out**"), row.figure
        if row.fitted:
            assert abs(row.error) <= (0.01 if "gpt-fast" not in row.source else 0.04), row
        else:
            assert abs(row.error) <= abs(float(doc[5].rstrip("%")) / 100) + 5e-4, row


def test_comparison_plot_has_both_figures_for_every_device() -> None:
    from hdex_jax.lpu import compare, plot_comparison

    rows = compare(OPT_66B, [2, 4, 8], 1039)
    fig = plot_comparison(rows)
    assert len(fig.axes) == 2
    for ax, attr in zip(fig.axes, ("ms_per_token", "joules_per_token")):
        lines = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
        assert lines["asic"] == [getattr(r.lpu, attr) for r in rows]
        assert lines["h100"] == [getattr(r.gpus["h100"], attr) for r in rows]
        assert lines["l4"] == [getattr(r.gpus["l4"], attr) for r in rows]


@pytest.mark.parametrize("call, error, message", [
    (lambda lpu: lpu.compare(OPT_1_3B, [1], 0, gpus="h100"), TypeError, "gpus must be a list"),
    (lambda lpu: lpu.compare(OPT_1_3B, [1], 0, gpus=[]), ValueError, "gpus is empty"),
    (lambda lpu: lpu.lpu_prefill(OPT_1_3B, 1, 0), ValueError, "prompt_len must be an integer >= 1"),
    (lambda lpu: lpu.gpu_prefill(OPT_1_3B, 1, 4096), ValueError, "max_position_embeddings=2048"),
    (lambda lpu: lpu.end_to_end(OPT_1_3B, 10, 0), ValueError, "output_len must be an integer >= 1"),
    (lambda lpu: lpu.end_to_end(OPT_1_3B, 10, 5, {"gpu": 1}), ValueError, "the key 'lpu'"),
    (lambda lpu: lpu.end_to_end(OPT_1_3B, 10, 5, {"gpu": 1, "lpu": 1}, gpu="tpu"), ValueError, "unknown GPU"),
])
def test_bad_comparison_and_generation_input(call, error: type, message: str) -> None:
    from hdex_jax import lpu

    with pytest.raises(error, match=message):
        call(lpu)


def test_a_decode_step_reads_only_the_chosen_experts():
    """Mixtral-shaped: with 1 row and k of 8 experts the step streams k/8 of the expert stacks (as model._moe
    gathers them); with 4 rows x 2 = 8 pairs it reads every expert."""
    base = ModelConfig(model_type="mixtral", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=64, embed_dim=64,
                       num_experts=8, experts_per_token=1)
    store = Storage("float16")
    experts = sum(store.nbytes(s) for n, s in flatten(param_specs(base)).items() if "experts" in s.axes)
    one, two = (traffic(dataclasses.replace(base, experts_per_token=k), 1, 16, 1, store) for k in (1, 2))
    assert two.weight_bytes - one.weight_bytes == pytest.approx(experts / 8, abs=16)
    dense = traffic(dataclasses.replace(base, experts_per_token=2), 1, 16, 4, store)
    assert dense.weight_bytes - two.weight_bytes >= experts * 3 / 4
