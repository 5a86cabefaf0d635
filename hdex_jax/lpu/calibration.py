"""The published LPU results, the workload they are compared at, and the fit of the "asic" preset to them.

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

from hdex_jax.config import ModelConfig
from hdex_jax.lpu.model import estimate
from hdex_jax.lpu.presets import Hardware, get_preset

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
