"""The prompt pass (prefill) on LPUs and on GPUs, and a generation's end-to-end latency, hybrid included.

Prefill runs the prompt's P tokens through every weight at once: the weights stream once and each matrix
does P times the MACs of a decode step, so a long prompt is bound by the matrix engine (LPU: MACs per cycle x
clock; GPU: dense tensor peak x `prefill_mfu`) rather than by memory. Attention adds the causal products of
the prompt with itself (each position with the `cfg.window(i)` positions it sees). The step's fixed costs
(instruction latency on the LPU, kernel overhead on the GPU) are paid once per instruction, and each sync
carries P rows. Counted for every prompt row, as an upper bound: the LM head and sampling, which only the
last row needs.

A generation of O tokens from a P-token prompt: the prefill produces the first token (time to first token),
then O - 1 decode steps at contexts P .. P + O - 2, costed at their mean context (the cost is linear in it).
The hybrid `device_map={"gpu": G, "lpu": L}` (as `AutoModelForCausalLM.from_pretrained` takes it) runs the
prefill on G GPUs, sends the prompt's KV cache to the L LPUs over the host links, and decodes on the LPUs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hdex_jax.config import ModelConfig
from hdex_jax.layout import padded_config
from hdex_jax.lpu.config_source import model_config
from hdex_jax.lpu.formats import DEFAULT_DTYPE, Storage, storage
from hdex_jax.lpu.gpu import collective_seconds, gpu_estimate
from hdex_jax.lpu.latency import SOFTMAX_PASSES, Traffic, estimate, matrix_seconds, sync_cost, traffic
from hdex_jax.lpu.presets import Gpu, Hardware, get_gpu, get_preset
from hdex_jax.validation import check_int, quote


@dataclasses.dataclass(frozen=True)
class Prefill:
    """Cost of the prompt pass of `prompt_len` tokens on `num_device` devices of `device` (an LPU or GPU preset)."""

    device: str
    num_device: int
    prompt_len: int
    ms: float  # the sum of `stages`: the time to first token
    stages: dict[str, float]  # critical-path milliseconds
    kv_cache_bytes: int  # the prompt's KV cache, all devices together (what a hybrid sends to the LPUs)


@dataclasses.dataclass(frozen=True)
class EndToEnd:
    """Latency of generating `output_len` tokens from a `prompt_len`-token prompt with `device_map`."""

    device_map: dict[str, int]
    prompt_len: int
    output_len: int
    prefill: Prefill
    transfer_ms: float  # the prompt's KV cache from the GPUs to the LPUs (hybrid only)
    decode_ms_per_token: float  # at the mean context of the decode steps
    decode_ms: float  # all output_len - 1 decode steps

    @property
    def ttft_ms(self) -> float:
        """Time to first token: the prompt pass, whose logits give it."""
        return self.prefill.ms

    @property
    def total_ms(self) -> float:
        return self.prefill.ms + self.transfer_ms + self.decode_ms


def parse_placement(device_map: dict[str, int] | None) -> tuple[int, int]:
    """(gpu, lpu) of a HyperDex device_map, checked as `from_pretrained` checks it ("lpu" >= 1, "gpu" >= 0),
    except against the devices this host has: an estimate may place a model on hardware it lacks."""
    if device_map is None:
        return 0, 1
    example = "e.g. {'lpu': 2} or {'gpu': 1, 'lpu': 2}"
    if not isinstance(device_map, dict) or set(device_map) - {"lpu", "gpu"} or "lpu" not in device_map:
        raise (TypeError if not isinstance(device_map, dict) else ValueError)(
            f"device_map must be a dict with the key 'lpu' and optionally 'gpu', {example}; got {quote(device_map)}")
    return (check_int("device_map['gpu']", device_map.get("gpu", 0), minimum=0),
            check_int("device_map['lpu']", device_map["lpu"], minimum=1))


def _attention(cfg: ModelConfig, num_device: int, prompt_len: int) -> tuple[int, int]:
    """(MACs, query-key pairs) of the prompt's causal attention on one device, each layer with its window."""
    padded = padded_config(cfg, num_device)
    pairs = sum(min(i + 1, padded.window(layer) or i + 1)
                for layer in range(padded.num_layers) for i in range(prompt_len))
    heads = padded.num_heads // num_device
    return 2 * heads * padded.head_dim * pairs, heads * pairs  # scores and values


def _kv_bytes(cfg: ModelConfig, prompt_len: int, store: Storage) -> int:
    """The prompt's K and V over every layer (a windowed layer keeps its last `window` positions)."""
    kept = sum(min(prompt_len, cfg.window(i) or prompt_len) for i in range(cfg.num_layers))
    return 2 * cfg.num_kv_heads * cfg.head_dim * kept * store.itemsize


def _prompt(config: ModelConfig | Any, num_device: int, prompt_len: int, dtype: str, quantize: str | None
            ) -> tuple[ModelConfig, Storage, Traffic, int, int]:
    num_device = check_int("num_device", num_device, minimum=1)
    prompt_len = check_int("prompt_len", prompt_len, minimum=1)
    config = model_config(config)
    if prompt_len > config.max_position_embeddings:
        raise ValueError(f"prompt_len {prompt_len} exceeds {config.model_type}'s max_position_embeddings="
                         f"{config.max_position_embeddings}")
    store = storage(dtype, quantize)
    macs, pairs = _attention(config, num_device, prompt_len)
    return config, store, traffic(config, num_device, 0, prompt_len, store), macs, pairs


def lpu_prefill(config: ModelConfig | Any, num_device: int, prompt_len: int, *, preset: str | Hardware = "asic",
                dtype: str = DEFAULT_DTYPE, quantize: str | None = None) -> Prefill:
    """The prompt pass on `num_device` LPUs: stages weights, attention, vector, pipeline, esl_sync (ms)."""
    hw = get_preset(preset)
    config, store, t, attn_macs, pairs = _prompt(config, num_device, prompt_len, dtype, quantize)
    kv = _kv_bytes(config, prompt_len, store)
    stages = {
        "weights": 1e3 * matrix_seconds(t.weight_bytes, t.weight_macs, hw),
        "attention": 1e3 * matrix_seconds(kv // num_device, attn_macs, hw),
        "vector": 1e3 * (t.vector_elements + pairs * SOFTMAX_PASSES) / (hw.vector_lanes * hw.clock_mhz * 1e6),
        "pipeline": 1e3 * t.ops * hw.op_latency_cycles / (hw.clock_mhz * 1e6),
        "esl_sync": sum(sync_cost(s, hw, num_device).exposed_ms for s in t.syncs),
    }
    return Prefill(hw.name, num_device, prompt_len, sum(stages.values()), stages, kv)


def gpu_prefill(config: ModelConfig | Any, num_device: int, prompt_len: int, *, gpu: str | Gpu = "h100",
                dtype: str = DEFAULT_DTYPE, quantize: str | None = None) -> Prefill:
    """The prompt pass on `num_device` GPUs: stages weights, attention, kernels, allreduce (ms)."""
    gpu = get_gpu(gpu)
    config, store, t, attn_macs, _ = _prompt(config, num_device, prompt_len, dtype, quantize)
    flops = gpu.peak_tflops * 1e12 * gpu.prefill_mfu
    stream = gpu.memory_bandwidth_gbs * 1e9 * gpu.stream_efficiency
    kv = _kv_bytes(config, prompt_len, store)
    stages = {
        "weights": 1e3 * max(t.weight_bytes / stream, 2 * t.weight_macs / flops),
        "attention": 1e3 * max(kv / num_device / stream, 2 * attn_macs / flops),
        "kernels": 1e3 * (t.ops + sum(s.count for s in t.syncs)) * gpu.kernel_overhead_us * 1e-6,
        "allreduce": 1e3 * sum(s.count * collective_seconds(s, gpu, num_device) for s in t.syncs),
    }
    return Prefill(gpu.name, num_device, prompt_len, sum(stages.values()), stages, kv)


def _check_lengths(config: ModelConfig, prompt_len: int, output_len: int) -> int:
    output_len = check_int("output_len", output_len, minimum=1)
    if prompt_len + output_len > config.max_position_embeddings:
        raise ValueError(f"prompt_len + output_len = {prompt_len + output_len} exceeds {config.model_type}'s "
                         f"max_position_embeddings={config.max_position_embeddings}")
    return output_len


def _decode_context(prompt_len: int, output_len: int) -> int:
    """Mean context of the output_len - 1 decode steps after the prefill (contexts prompt .. prompt + O - 2)."""
    return prompt_len + max(0, output_len - 2) // 2


def end_to_end(config: ModelConfig | Any, prompt_len: int, output_len: int,
               device_map: dict[str, int] | None = None, *, preset: str | Hardware = "asic",
               gpu: str | Gpu = "h100", dtype: str = DEFAULT_DTYPE, quantize: str | None = None) -> EndToEnd:
    """Latency of a generation on LPUs, prefill on GPUs when `device_map` has "gpu" (the hybrid).

    `device_map` is `from_pretrained`'s: {"lpu": L} runs everything on L LPUs; {"gpu": G, "lpu": L} runs the
    prompt pass on G GPUs of preset `gpu`, then sends the KV cache to the LPUs (one host link per LPU
    receiving, at the slower of the two ends) and decodes there.
    """
    gpus, lpus = parse_placement(device_map)
    config = model_config(config)
    output_len = _check_lengths(config, check_int("prompt_len", prompt_len, minimum=1), output_len)
    hw = get_preset(preset)
    if gpus:
        prefill = gpu_prefill(config, gpus, prompt_len, gpu=gpu, dtype=dtype, quantize=quantize)
        link = min(get_gpu(gpu).host_link_gbs, hw.host_link_gbs) * min(gpus, lpus)
        transfer = 1e3 * prefill.kv_cache_bytes / (link * 1e9)
    else:
        prefill, transfer = lpu_prefill(config, lpus, prompt_len, preset=hw, dtype=dtype, quantize=quantize), 0.0
    step = estimate(config, lpus, _decode_context(prompt_len, output_len), preset=hw, dtype=dtype,
                    quantize=quantize).ms_per_token
    return EndToEnd({"gpu": gpus, "lpu": lpus} if gpus else {"lpu": lpus}, prompt_len, output_len, prefill,
                    transfer, step, step * (output_len - 1))


def gpu_end_to_end(config: ModelConfig | Any, prompt_len: int, output_len: int, num_device: int = 1, *,
                   gpu: str | Gpu = "h100", dtype: str = DEFAULT_DTYPE, quantize: str | None = None) -> EndToEnd:
    """Latency of the same generation on `num_device` GPUs alone (its device_map is {"gpu": num_device})."""
    config = model_config(config)
    output_len = _check_lengths(config, check_int("prompt_len", prompt_len, minimum=1), output_len)
    prefill = gpu_prefill(config, num_device, prompt_len, gpu=gpu, dtype=dtype, quantize=quantize)
    step = gpu_estimate(config, num_device, _decode_context(prompt_len, output_len), gpu=gpu, dtype=dtype,
                        quantize=quantize).ms_per_token
    return EndToEnd({"gpu": num_device}, prompt_len, output_len, prefill, 0.0, step, step * (output_len - 1))
