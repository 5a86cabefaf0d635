"""The published LPU results, the workload they are compared at, and the fit of the "asic" preset to them;
the GPU measurements the GPU model is fitted to (`fit_gpu`); and the fidelity table of every published figure,
fitted or held out (`fidelity_table`).

Published (arXiv 2408.07326 / IEEE Micro 2024, abstract and summary of results):

- OPT-1.3B on one LPU: 1.25 ms/token;
- OPT-66B on two LPUs: 20.9 ms/token;
- ESL scaling: about 1.75x speedup for each doubling of the number of devices;
- memory bandwidth utilisation: up to 90%.

The prompt and output lengths behind the latencies are not stated in the material this project could
verify. The model's cost is linear in the context, so a generation's mean ms/token equals the estimate at
its mean context; we assume a generation that fills OPT's 2048-position window from a short prompt (`PROMPT_LEN`
then `OUTPUT_LEN` tokens) and calibrate at its mean context, `CALIBRATION_CONTEXT`. The docs show how much
the estimates move over the whole window, i.e. how much this assumption can matter.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hdex_jax.config import ModelConfig
from hdex_jax.lpu.gpu import gpu_estimate
from hdex_jax.lpu.latency import estimate
from hdex_jax.lpu.presets import A100_SXM, Gpu, Hardware, get_preset

PAPER = "arXiv 2408.07326 (IEEE Micro 44(6), 2024)"

# [assumption] The workload: a 32-token prompt, then output up to OPT's 2048 positions.
PROMPT_LEN, OUTPUT_LEN = 32, 2016


def mean_context(prompt_len: int, output_len: int) -> int:
    """Mean KV-cache length over the output tokens of one generation (output token i sees prompt + i)."""
    return prompt_len + (output_len - 1) // 2


CALIBRATION_CONTEXT = mean_context(PROMPT_LEN, OUTPUT_LEN)

# The two published models, as their Hugging Face config.json files give them (facebook/opt-1.3b, -66b).
_OPT_COMMON: dict[str, Any] = {
    "model_type": "opt", "architectures": ["OPTForCausalLM"], "activation_function": "relu",
    "do_layer_norm_before": True, "enable_bias": True, "layer_norm_elementwise_affine": True,
    "tie_word_embeddings": True, "vocab_size": 50272, "max_position_embeddings": 2048, "dropout": 0.1,
    "attention_dropout": 0.0, "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1, "torch_dtype": "float16",
}
OPT_HF_CONFIGS: dict[str, dict[str, Any]] = {
    "facebook/opt-1.3b": {**_OPT_COMMON, "hidden_size": 2048, "num_hidden_layers": 24,
                          "num_attention_heads": 32, "ffn_dim": 8192, "word_embed_proj_dim": 2048},
    "facebook/opt-66b": {**_OPT_COMMON, "hidden_size": 9216, "num_hidden_layers": 64,
                         "num_attention_heads": 72, "ffn_dim": 36864, "word_embed_proj_dim": 9216},
}


@dataclasses.dataclass(frozen=True)
class LatencyPoint:
    """A published ms/token of a model on some number of devices."""

    model: str
    num_device: int
    ms_per_token: float


LATENCY_POINTS = (LatencyPoint("facebook/opt-1.3b", 1, 1.25), LatencyPoint("facebook/opt-66b", 2, 20.9))
# [paper] ESL: "1.75x speedup for doubling the number of devices". [assumption] Measured on the published
# multi-device model, OPT-66B, doubling from the two devices it needs up to eight.
SPEEDUP_PER_DOUBLING, SCALING_MODEL, SCALING_DEVICES = 1.75, "facebook/opt-66b", (2, 4, 8)
# [paper] "up to 90% bandwidth utilization".
PEAK_UTILIZATION = 0.90


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the calibration table: a published figure next to the model's estimate."""

    figure: str
    published: float
    estimated: float

    @property
    def error(self) -> float:
        """Relative error of the estimate."""
        return self.estimated / self.published - 1


def opt_configs() -> dict[str, ModelConfig]:
    """The published models as `ModelConfig`, converted from their config.json by `converters`."""
    from converters import config_from_hf

    return {name: config_from_hf(hf) for name, hf in OPT_HF_CONFIGS.items()}


def speedup_per_doubling(config: ModelConfig, devices: Sequence[int], context_len: int, *,
                         preset: str | Hardware = "asic") -> float:
    """Geometric-mean speedup per doubling of devices between the first and last of `devices`."""
    first = estimate(config, devices[0], context_len, preset=preset).ms_per_token
    last = estimate(config, devices[-1], context_len, preset=preset).ms_per_token
    return (first / last) ** (1 / math.log2(devices[-1] / devices[0]))


def calibration_table(configs: Mapping[str, ModelConfig] | None = None, *, preset: str | Hardware = "asic",
                      context_len: int = CALIBRATION_CONTEXT) -> list[Row]:
    """Every published figure next to the estimate of `preset` (by default the "asic" preset).

    `configs` maps the model names of `OPT_HF_CONFIGS` to their `ModelConfig`; by default they are converted
    from those config.json values.
    """
    configs = opt_configs() if configs is None else configs
    rows = []
    utilizations = []
    for point in LATENCY_POINTS:
        est = estimate(configs[point.model], point.num_device, context_len, preset=preset)
        rows.append(Row(f"{point.model.split('/')[-1]} on {point.num_device} device(s), ms/token",
                        point.ms_per_token, est.ms_per_token))
        utilizations.append(est.bandwidth_utilization)
    rows.append(Row(f"speedup per doubling ({SCALING_MODEL.split('/')[-1]}, {SCALING_DEVICES[0]} to "
                    f"{SCALING_DEVICES[-1]} devices)", SPEEDUP_PER_DOUBLING,
                    speedup_per_doubling(configs[SCALING_MODEL], SCALING_DEVICES, context_len, preset=preset)))
    rows.append(Row("peak bandwidth utilisation (over the points above)", PEAK_UTILIZATION, max(utilizations)))
    return rows


def fit_bandwidth_and_latency(configs: Mapping[str, ModelConfig], hardware: str | Hardware = "asic", *,
                              context_len: int = CALIBRATION_CONTEXT) -> Hardware:
    """`hardware` with memory bandwidth and per-instruction latency that reproduce both published latencies.

    With the streaming efficiency held at the published 90%, the time of a decode step is linear in the
    inverse bandwidth and in the instruction latency (at batch 1 the streams, not the MACs, bind), so the two
    published points determine both: one linear solve, the coefficients measured on the model itself.
    """
    hw = get_preset(hardware)

    def times(inv_bandwidth: float, latency: float) -> list[float]:
        trial = dataclasses.replace(hw, memory_bandwidth_gbs=1 / inv_bandwidth, op_latency_cycles=latency)
        return [estimate(configs[p.model], p.num_device, context_len, preset=trial).ms_per_token
                for p in LATENCY_POINTS]

    x0, y0 = 1 / hw.memory_bandwidth_gbs, float(hw.op_latency_cycles)
    base, dx, dy = times(x0, y0), times(2 * x0, y0), times(x0, 2 * y0)
    # t_i = base_i + a_i (x - x0) + b_i (y - y0), solved for t_i = published_i.
    (a1, a2), (b1, b2) = [(d - t) / x0 for d, t in zip(dx, base)], [(d - t) / y0 for d, t in zip(dy, base)]
    r1, r2 = [p.ms_per_token - t for p, t in zip(LATENCY_POINTS, base)]
    det = a1 * b2 - a2 * b1
    x = x0 + (r1 * b2 - r2 * b1) / det
    y = y0 + (a1 * r2 - a2 * r1) / det
    return dataclasses.replace(hw, memory_bandwidth_gbs=1 / x, op_latency_cycles=max(1, round(y)))


# --- The GPU model's calibration: published GPU measurements that are not the LPU paper's ---

# [secondary] gpt-fast (github.com/pytorch-labs/gpt-fast, README, PyTorch team, Nov 2023): batch-1 decode of
# Llama-2 with torch.compile and CUDA graphs, "8xA100-80GB, power limited to 330W", default workload of
# generate.py: the prompt "Hello, my name is" (6 tokens with BOS) and 200 new tokens. Recalled from the README,
# which could not be re-read in this session (no network): check it before relying on the last digits.
GPU_SOURCE = "gpt-fast README (pytorch-labs/gpt-fast), A100-80GB SXM"
GPU_PROMPT_LEN, GPU_OUTPUT_LEN = 6, 200
GPU_CONTEXT = mean_context(GPU_PROMPT_LEN, GPU_OUTPUT_LEN)
LLAMA2_HF_CONFIGS: dict[str, dict[str, Any]] = {
    name: {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "vocab_size": 32000,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "tie_word_embeddings": False, "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2, **shape}
    for name, shape in {
        "meta-llama/Llama-2-7b-hf": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                                     "num_attention_heads": 32, "num_key_value_heads": 32},
        "meta-llama/Llama-2-70b-hf": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                                      "num_attention_heads": 64, "num_key_value_heads": 8},
    }.items()}


@dataclasses.dataclass(frozen=True)
class GpuPoint:
    """A published batch-1 decode speed of a model on some number of GPUs, in a storage format."""

    model: str
    num_device: int
    tokens_per_s: float
    dtype: str = "bfloat16"

    @property
    def ms_per_token(self) -> float:
        return 1e3 / self.tokens_per_s

    @property
    def label(self) -> str:
        return f"{self.model.split('/')[-1]} {self.dtype} on {self.num_device} {A100_SXM.name}(s), ms/token"


# Fitted: bf16 on 1, 2, 4, 8 GPUs (the TP table). Held out: the weight-only quantized runs on one GPU, which
# test the bytes counted for int8 (per-channel scales) and int4 (groups of 32) as well as the GPU model.
GPU_POINTS = (
    GpuPoint("meta-llama/Llama-2-7b-hf", 1, 104.9), GpuPoint("meta-llama/Llama-2-7b-hf", 2, 168.84),
    GpuPoint("meta-llama/Llama-2-7b-hf", 4, 254.02), GpuPoint("meta-llama/Llama-2-7b-hf", 8, 328.43),
    GpuPoint("meta-llama/Llama-2-70b-hf", 2, 21.32), GpuPoint("meta-llama/Llama-2-70b-hf", 4, 38.01),
    GpuPoint("meta-llama/Llama-2-70b-hf", 8, 62.50),
)
GPU_HELD_OUT = (
    GpuPoint("meta-llama/Llama-2-7b-hf", 1, 155.58, "int8"), GpuPoint("meta-llama/Llama-2-7b-hf", 1, 196.80, "int4"),
    GpuPoint("meta-llama/Llama-2-70b-hf", 1, 19.13, "int8"), GpuPoint("meta-llama/Llama-2-70b-hf", 1, 25.25, "int4"),
)


def llama2_configs() -> dict[str, ModelConfig]:
    """The GPU calibration's models as `ModelConfig`, converted from their config.json by `converters`."""
    from converters import config_from_hf

    return {name: config_from_hf(hf) for name, hf in LLAMA2_HF_CONFIGS.items()}


def _gpu_software(gpu: Gpu, inv_efficiency: float, overhead_us: float, latency_us: float) -> Gpu:
    return dataclasses.replace(gpu, stream_efficiency=1 / inv_efficiency, kernel_overhead_us=overhead_us,
                               allreduce_latency_us=latency_us)


def fit_gpu(configs: Mapping[str, ModelConfig] | None = None, points: Sequence[GpuPoint] = GPU_POINTS,
            gpu: Gpu = A100_SXM, context_len: int = GPU_CONTEXT) -> dict[str, float]:
    """The GPU software costs (`GPU_SOFTWARE`'s fitted keys) that best reproduce `points` on `gpu`.

    A step's time is linear in 1 / stream efficiency, in the kernel overhead and in the all-reduce latency,
    so the fit is one linear least-squares solve, on errors relative to each published time.
    """
    configs = llama2_configs() if configs is None else configs

    def times(x: Sequence[float]) -> np.ndarray:
        trial = _gpu_software(gpu, *x)
        return np.array([gpu_estimate(configs[p.model], p.num_device, context_len, gpu=trial,
                                      dtype=p.dtype).ms_per_token for p in points])

    x0 = np.ones(3)
    base = times(x0)
    columns = np.stack([times(x0 + np.eye(3)[i]) - base for i in range(3)], axis=1)  # [points, 3]
    measured = np.array([p.ms_per_token for p in points])
    # t(x) = base + columns (x - x0); minimise sum ((t(x) - measured) / measured)^2.
    x, *_ = np.linalg.lstsq(columns / measured[:, None], (measured - base) / measured + columns @ x0 / measured,
                            rcond=None)
    return {"stream_efficiency": 1 / x[0], "kernel_overhead_us": x[1], "allreduce_latency_us": x[2]}


def gpu_table(configs: Mapping[str, ModelConfig] | None = None) -> list[Row]:
    """The GPU model (`a100` preset, the fitted software) against each published GPU point, fitted and held out."""
    configs = llama2_configs() if configs is None else configs
    return [Row(p.label, p.ms_per_token, gpu_estimate(configs[p.model], p.num_device, GPU_CONTEXT, gpu=A100_SXM,
                                                      dtype=p.dtype).ms_per_token)
            for p in (*GPU_POINTS, *GPU_HELD_OUT)]


# --- The fidelity table: every published figure, fitted or held out, against the model ---

# [primary] The paper's abstract compares the LPU with GPUs: faster at equal device count on the two published
# points, and its servers more energy efficient than H100 and L4 servers.
SPEEDUP_OVER_GPU = {"facebook/opt-1.3b": 2.09, "facebook/opt-66b": 1.37}
ENERGY_EFFICIENCY = {"h100": 1.33, "l4": 1.32}
# [assumption] The model and device count of the energy comparison are not stated in the material this
# project could verify: OPT-1.3B on one device, the only published model one L4 (24 GB) holds.
ENERGY_MODEL = "facebook/opt-1.3b"
# [assumption] HyperAccel's LPU servers (Orion) are built of Alveo U55C cards, so the servers' energy figures
# are compared with the "fpga-u55c" preset; the "asic" preset's are shown too. Both were computed before this
# choice was written down (see docs/lpu_performance_model.md).
ENERGY_PRESETS = ("fpga-u55c", "asic")


@dataclasses.dataclass(frozen=True)
class Fidelity(Row):
    """A row of the fidelity table: a published figure, its source, and whether the model was fitted to it."""

    source: str  # "primary: ..." or "secondary: ..."
    fitted: bool


def fidelity_table(configs: Mapping[str, ModelConfig] | None = None,
                   gpu_configs: Mapping[str, ModelConfig] | None = None) -> list[Fidelity]:
    """Every published figure the model is compared with: the LPU paper's (`PAPER`), then the GPU
    measurements (`GPU_SOURCE`)."""
    configs = opt_configs() if configs is None else configs
    ctx = CALIBRATION_CONTEXT
    abstract, summaries = "primary: paper, abstract", "secondary: summaries of the paper"
    lpu = calibration_table(configs)
    out = [Fidelity(r.figure, r.published, r.estimated, abstract, True) for r in lpu[:2]]
    out.append(Fidelity(lpu[2].figure, lpu[2].published, lpu[2].estimated, summaries, True))
    out.append(Fidelity(lpu[3].figure, lpu[3].published, lpu[3].estimated, summaries, False))
    small = estimate(configs["facebook/opt-1.3b"], 1, ctx).bandwidth_utilization
    out.append(Fidelity("bandwidth utilisation of OPT-1.3B on 1 device (~90% whatever the size)",
                        PEAK_UTILIZATION, small, summaries, False))
    for point in LATENCY_POINTS:
        cfg = configs[point.model]
        gpu_ms = gpu_estimate(cfg, point.num_device, ctx, gpu="h100").ms_per_token
        lpu_ms = estimate(cfg, point.num_device, ctx).ms_per_token
        out.append(Fidelity(f"LPU speedup over H100, {point.model.split('/')[-1]} on {point.num_device} device(s)",
                            SPEEDUP_OVER_GPU[point.model], gpu_ms / lpu_ms, abstract, False))
    for preset in ENERGY_PRESETS:
        lpu_j = estimate(configs[ENERGY_MODEL], 1, ctx, preset=preset).joules_per_token
        for gpu, published in ENERGY_EFFICIENCY.items():
            gpu_j = gpu_estimate(configs[ENERGY_MODEL], 1, ctx, gpu=gpu).joules_per_token
            out.append(Fidelity(f"energy efficiency over {gpu.upper()} server ({preset}, "
                                f"{ENERGY_MODEL.split('/')[-1]}, 1 device)", published, gpu_j / lpu_j, abstract,
                                False))
    fitted = {(p.model, p.num_device, p.dtype) for p in GPU_POINTS}
    for row, p in zip(gpu_table(gpu_configs), (*GPU_POINTS, *GPU_HELD_OUT)):
        out.append(Fidelity(row.figure, row.published, row.estimated, "secondary: gpt-fast README",
                            (p.model, p.num_device, p.dtype) in fitted))
    return out


def fidelity_markdown(rows: Sequence[Fidelity]) -> str:
    """The fidelity table as docs/lpu_performance_model.md shows it."""
    lines = ["| published figure | source | fitted or held out | published | model | error |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r.figure} | {r.source} | {'fitted' if r.fitted else '**held out**'} | {r.published:.4g} | "
              f"{r.estimated:.4g} | {r.error:+.1%} |" for r in rows]
    return "\n".join(lines)
