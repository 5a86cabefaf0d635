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
    for header in ("ms/token", "tokens/s", "speedup", "BW util", "ESL exposed ms", "GPU-style ms/token"):
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
    assert any("ideal" in label for label in labels) and any("GPU" in label for label in labels)
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
