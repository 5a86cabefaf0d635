"""Analytical per-token decode latency of a model on N GPUs (tensor parallel), beside the LPU's.

The GPU runs the same decode step, counted from the same declarations (`model.traffic`), with what makes a
GPU slow at batch 1:

- weights, kv_cache: the bytes streamed / (peak bandwidth x `stream_efficiency`), or the FLOPs at the dense
  tensor peak when a batch makes them bind;
- kernels: a fixed `kernel_overhead_us` per kernel (launch from a CUDA graph, synchronisation, the ramp-up and
  tail of a short kernel); one kernel per instruction the LPU would issue. Together with the stream this
  makes the achieved bandwidth of a matrix a function of its size (`achieved_bandwidth_gbs`): a small matrix
  spends its time in the overhead, so splitting a model over more GPUs lowers each GPU's bandwidth;
- allreduce: every tensor-parallel sync is an NCCL collective that starts after its producing kernel and stalls
  compute until done: `allreduce_latency_us` + the ring's wire bytes / link bandwidth.

The software costs are fitted to published GPU measurements (`calibration.fit_gpu`), never to the LPU paper's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hdex_jax.config import ModelConfig
from hdex_jax.lpu.energy import gpu_device_power_w, server_power_w
from hdex_jax.lpu.formats import DEFAULT_DTYPE
from hdex_jax.lpu.latency import StepFigures, Sync, check_step, traffic
from hdex_jax.lpu.presets import Gpu, get_gpu


@dataclasses.dataclass(frozen=True)
class GpuEstimate(StepFigures):
    """Cost of generating one token (per decode step) of `batch` rows on `num_device` GPUs."""

    model_type: str
    gpu: str
    num_device: int
    context_len: int
    dtype: str
    stages: dict[str, float]  # critical-path milliseconds: weights, kv_cache, kernels, allreduce
    kernels: int  # kernels per step on one GPU


def achieved_bandwidth_gbs(gpu: str | Gpu, matrix_bytes: float) -> float:
    """Bandwidth one kernel streaming `matrix_bytes` achieves: its bytes over its stream time plus overhead."""
    gpu = get_gpu(gpu)
    seconds = gpu.kernel_overhead_us * 1e-6 + matrix_bytes / (gpu.memory_bandwidth_gbs * 1e9 * gpu.stream_efficiency)
    return matrix_bytes / seconds / 1e9


def collective_seconds(sync: Sync, gpu: Gpu, num_device: int) -> float:
    """One NCCL ring collective of `sync`'s payload on `num_device` GPUs, compute stalled meanwhile."""
    n = num_device
    share = 2 * (n - 1) / n if sync.kind == "all-reduce" else (n - 1) / n
    return gpu.allreduce_latency_us * 1e-6 + share * sync.payload_bytes / (gpu.link_gbs * 1e9)


def _stream_seconds(nbytes: int, macs: int, gpu: Gpu) -> float:
    return max(nbytes / (gpu.memory_bandwidth_gbs * 1e9 * gpu.stream_efficiency), 2 * macs / (gpu.peak_tflops * 1e12))


def gpu_estimate(config: ModelConfig | Any, num_device: int, context_len: int, *, gpu: str | Gpu = "h100",
                 batch: int = 1, dtype: str = DEFAULT_DTYPE, quantize: str | None = None) -> GpuEstimate:
    """Estimated per-token decode latency of `config` on `num_device` GPUs.

    Takes the arguments of `hdex_jax.lpu.estimate`, with `gpu` ("h100", "l4", "a100" or a `Gpu`) in place of
    `preset`. Bad arguments raise as `estimate`'s do.
    """
    gpu = get_gpu(gpu)
    num_device, context_len, batch, store, config = check_step(config, num_device, context_len, batch, dtype,
                                                               quantize)
    t = traffic(config, num_device, context_len, batch, store)
    kernels = t.ops + sum(s.count for s in t.syncs)
    stages = {
        "weights": 1e3 * _stream_seconds(t.weight_bytes, t.weight_macs, gpu),
        "kv_cache": 1e3 * _stream_seconds(t.kv_bytes, t.kv_macs, gpu),
        "kernels": 1e3 * kernels * gpu.kernel_overhead_us * 1e-6,
        "allreduce": 1e3 * sum(s.count * collective_seconds(s, gpu, num_device) for s in t.syncs),
    }
    ms = sum(stages.values())
    utilization = (t.weight_bytes + t.kv_bytes) / (ms * 1e-3) / (gpu.memory_bandwidth_gbs * 1e9)
    return GpuEstimate(
        model_type=config.model_type, gpu=gpu.name, num_device=num_device, context_len=context_len, batch=batch,
        dtype=store.name, ms_per_token=ms, stages=stages, kernels=kernels, weight_stream_bytes=t.weight_bytes,
        kv_stream_bytes=t.kv_bytes, device_weight_bytes=t.device_weight_bytes,
        device_kv_cache_bytes=t.kv_cache_bytes, memory_bandwidth_gbs=gpu.memory_bandwidth_gbs,
        memory_capacity_gb=gpu.memory_capacity_gb,
        power_w=server_power_w(gpu_device_power_w(gpu, utilization), num_device))
