"""Analytical per-token decode latency of a model on N LPU devices.

Everything the model counts comes from the model description the datapath runs: `padded_config(cfg, N)`
(head padding for N devices) and its weight declarations `param_specs`, whose logical axes say what is split
over the devices (`LOGICAL_RULES`: heads, kv_heads, ffn, vocab) and what is replicated. Weight bytes, shards,
MACs and ESL syncs are read off the declarations (a row-parallel matrix is one that writes the residual axis
from a split input); KV and vector work off the padded config's head counts and sizes. No architecture is
retyped here, so a new family or option is costed as soon as it is declared.

The LPU decodes one token as a chain of dependent instructions that stream weights from memory. One token
costs one device:

- weights:   the bytes of its weight shards / (bandwidth * stream efficiency), or its MACs / MAC rate when
             the batch makes it compute bound;
- kv_cache:  the same for the K and V entries it reads and writes;
- vector:    elements of norms, biases, residual adds, RoPE, softmax, activations and sampling / lane rate;
- pipeline:  a fixed latency for every dependent instruction (memory latency, pipeline fill and drain);
- esl_sync:  the exposed part of each ESL sync. ESL sends partial sums while the producing matrix is still
             streaming, so only the hop latency and any transfer longer than that matrix are exposed.

The baseline (`baseline_ms_per_token`) is the same model with every sync a ring all-reduce (alpha-beta) that
waits for the producing matrix to finish and stalls compute until it is done: what overlapping the sync buys.
A GPU is modelled separately, in `hdex_jax.lpu.gpu`, from the same `traffic`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from hdex_jax.config import ModelConfig
from hdex_jax.layout import padded_config
from hdex_jax.lpu.config_source import model_config
from hdex_jax.lpu.energy import lpu_device_power_w, server_power_w
from hdex_jax.lpu.formats import DEFAULT_DTYPE, Storage, storage
from hdex_jax.lpu.presets import Hardware, get_preset
from hdex_jax.params import ParamSpec, flatten, param_specs
from hdex_jax.sharding import LOGICAL_RULES
from hdex_jax.validation import check_int

# Logical axes split over the LPU devices; every other axis is replicated.
SPLIT_AXES = frozenset(axis for axis, mesh_axis in LOGICAL_RULES.items() if mesh_axis)
# Tables read one row per token rather than streamed whole (the tied embedding is also the LM head).
LOOKUP_TABLES = ("embed", "pos_embed")
# A matrix whose last axis is the residual stream writes the full hidden vector: when its input is split over
# the devices, each holds a partial sum that must be all-reduced (the Megatron row-parallel layer).
RESIDUAL_AXES = frozenset({"embed", "embed_in"})
# Passes of the vector engine over each element: a norm reads once for its statistics and once to scale;
# softmax reads for the max, for exp-and-sum and to normalise; sampling is a softmax plus a top-k/top-p pass.
NORM_PASSES, SOFTMAX_PASSES, SAMPLING_PASSES = 2, 3, 4
# Instructions per layer that no weight declares: attention scores, softmax, attention-weighted values and
# the activation (RoPE adds one more where the model has it); sampling adds one per token.
UNDECLARED_LAYER_OPS = 4


@dataclasses.dataclass(frozen=True)
class SyncCost:
    """One kind of ESL sync in a decode step, summed over its occurrences in one token."""

    name: str  # the weight whose output is synchronised, e.g. "layers/attn/o/w"
    kind: str  # "all-reduce" (partial sums) or "all-gather" (vocab-parallel logits)
    count: int  # occurrences per token (per layer syncs count once per layer)
    payload_bytes: int  # bytes of the full vector synchronised, per occurrence
    overlapped_ms: float  # ESL transfer time hidden under the producing matrix, per token
    exposed_ms: float  # ESL time on the critical path, per token
    baseline_ms: float  # the GPU-style ring collective, all exposed, per token


@dataclasses.dataclass(frozen=True)
class StepFigures:
    """The fields every decode-step estimate has, LPU (`Estimate`) or GPU (`GpuEstimate`), and the figures derived
    from them."""

    batch: int
    ms_per_token: float  # latency of one decode step: the sum of the estimate's `stages`
    weight_stream_bytes: int  # weight bytes one device reads per step (lookup tables: only their rows)
    kv_stream_bytes: int  # KV bytes one device reads and writes per step
    device_weight_bytes: int  # weights stored on one device
    device_kv_cache_bytes: int  # KV cache stored on one device at this context
    memory_bandwidth_gbs: float
    memory_capacity_gb: float
    power_w: float  # wall power of the server of `num_device` devices during the step (`hdex_jax.lpu.energy`)

    @property
    def streamed_bytes(self) -> int:
        """Bytes one device moves through memory per step."""
        return self.weight_stream_bytes + self.kv_stream_bytes

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second over the whole batch."""
        return self.batch * 1e3 / self.ms_per_token

    @property
    def bandwidth_utilization(self) -> float:
        """Achieved memory bandwidth over the step divided by the peak."""
        return self.streamed_bytes / (self.ms_per_token * 1e-3) / (self.memory_bandwidth_gbs * 1e9)

    @property
    def fits_in_memory(self) -> bool:
        return self.device_weight_bytes + self.device_kv_cache_bytes <= self.memory_capacity_gb * 1e9

    @property
    def joules_per_token(self) -> float:
        """Energy at the wall of the whole server (`power_w`) per generated token."""
        return self.power_w * self.ms_per_token * 1e-3 / self.batch

    @property
    def tokens_per_joule(self) -> float:
        return 1 / self.joules_per_token


@dataclasses.dataclass(frozen=True)
class Estimate(StepFigures):
    """Cost of generating one token (per decode step) of `batch` rows on `num_device` LPU devices."""

    model_type: str
    preset: str
    num_device: int
    context_len: int
    dtype: str  # the storage format's name: a float dtype, or the quantized format of the matrices
    stages: dict[str, float]  # critical-path milliseconds: weights, kv_cache, vector, pipeline, esl_sync
    syncs: tuple[SyncCost, ...]  # each ESL sync, overlapped part separated from the exposed part
    baseline_ms_per_token: float  # the same step with ring all-reduces that do not overlap compute
    weight_bytes: int  # all declared weights of the padded model, in `dtype`

    @property
    def sync_exposed_ms(self) -> float:
        return sum(s.exposed_ms for s in self.syncs)

    @property
    def sync_overlapped_ms(self) -> float:
        return sum(s.overlapped_ms for s in self.syncs)


@dataclasses.dataclass(frozen=True)
class Sync:
    name: str
    kind: str
    count: int
    payload_bytes: int
    # Bytes one device streams, and MACs it does, for the matrix producing one occurrence: the transfer hides
    # under that matrix's time.
    producer_bytes: int
    producer_macs: int


@dataclasses.dataclass(frozen=True)
class Traffic:
    """What one decode step asks of one device, counted from the declarations (shared by the GPU model)."""

    total_weight_bytes: int
    device_weight_bytes: int
    weight_bytes: int
    weight_macs: int
    kv_bytes: int
    kv_macs: int
    kv_cache_bytes: int
    vector_elements: int
    ops: int
    syncs: tuple[Sync, ...]


def _split_axis(spec: ParamSpec) -> int | None:
    split = [i for i, axis in enumerate(spec.axes) if axis in SPLIT_AXES]
    assert len(split) <= 1, f"{spec} is split on more than one axis"
    return split[0] if split else None


def _device_shape(spec: ParamSpec, num_device: int) -> tuple[int, ...]:
    """Shape of one device's shard (an uneven split is padded up, as the datapath pads it)."""
    axis = _split_axis(spec)
    shape = list(spec.shape)
    if axis is not None:
        shape[axis] = math.ceil(shape[axis] / num_device)
    return tuple(shape)


def _layer_count(name: str, spec: ParamSpec) -> int:
    """How many times per token a weight's instruction runs: once per layer for stacked weights."""
    return spec.shape[0] if name.startswith("layers/") else 1


def attended_positions(cfg: ModelConfig, context_len: int) -> int:
    """KV positions one decode step reads, summed over the layers: each layer its own window
    (`cfg.window(i)`, as the datapath applies it), the cached entries plus the new one."""
    return sum(min(context_len + 1, cfg.window(i) or context_len + 1) for i in range(cfg.num_layers))


def traffic(cfg: ModelConfig, num_device: int, context_len: int, batch: int, store: Storage) -> Traffic:
    """Walk the declarations of `cfg` padded for `num_device` and count one device's work for one step."""
    padded = padded_config(cfg, num_device)
    specs = flatten(param_specs(padded))
    itemsize = store.itemsize

    total = device = streamed = macs = vector = ops = 0
    syncs: list[Sync] = []
    for name, spec in specs.items():
        shard = _device_shape(spec, num_device)
        leaf = name.rsplit("/", 1)[-1]
        matrix = leaf not in ("scale", "b", "bias") and name != "alibi_slopes"
        shard_bytes = store.nbytes(spec, shape=shard, matrix=matrix)
        total += store.nbytes(spec, matrix=matrix)
        device += shard_bytes
        per_token = _layer_count(name, spec)
        split = _split_axis(spec) is not None
        if name in LOOKUP_TABLES:
            # One row per batch row is read (from a vocab-split table only by the row's owner: counted on every
            # device, an upper bound of a few kilobytes).
            streamed += batch * shard_bytes // shard[0]
            ops += 1
            if name == "embed" and split:
                syncs.append(Sync(name, "all-reduce", 1, batch * spec.shape[-1] * itemsize, 0, 0))
            if name == "embed" and cfg.tie_embeddings:
                streamed += shard_bytes
                macs += batch * math.prod(shard)
                ops += 1
                syncs.extend(_logits_sync(name, spec, shard, shard_bytes, num_device, batch, itemsize))
        elif leaf == "scale":
            # A norm: every device normalises the full replicated vector.
            streamed += shard_bytes
            vector += NORM_PASSES * batch * math.prod(shard)
            ops += per_token
        elif leaf in ("b", "bias"):
            streamed += shard_bytes
            vector += batch * math.prod(shard)
        else:
            # A matrix (leaf "w", or a bare projection such as lm_head / project_in / project_out). An expert
            # stack is read only for the rows' chosen experts when they are fewer than all (model._moe).
            share = expert_share(cfg, batch) if "experts" in spec.axes else 1.0
            streamed += round(shard_bytes * share)
            macs += round(batch * math.prod(shard) * share)
            ops += per_token
            if spec.axes[-1] in RESIDUAL_AXES and split:
                syncs.append(Sync(name, "all-reduce", per_token, batch * spec.shape[-1] * itemsize,
                                   shard_bytes // per_token, batch * math.prod(shard) // per_token))
                # The partial sum, once reduced, is added to the residual stream.
                vector += per_token * batch * spec.shape[-1]
                ops += per_token
            elif spec.axes[-1] == "vocab":
                syncs.extend(_logits_sync(name, spec, shard, shard_bytes, num_device, batch, itemsize))

    L = padded.num_layers
    heads, kv_heads = padded.num_heads // num_device, padded.num_kv_heads // num_device
    attended = attended_positions(padded, context_len)  # over all layers
    # K and V of one position of one layer on this device; every attended one is read (by each query head of
    # its group) and the new one is also written.
    kv_elements = 2 * kv_heads * padded.head_dim * batch
    kv_bytes = kv_elements * (attended + L) * itemsize
    kv_macs = kv_elements * attended * (heads // kv_heads)

    ffn = math.ceil(padded.intermediate_size / num_device)
    vector += batch * heads * attended * SOFTMAX_PASSES
    vector += batch * L * ffn * (2 if padded.gated_mlp else 1)  # activation (times the gate)
    if padded.positions == "rope":
        vector += batch * L * (heads + kv_heads) * padded.rope_dim
    vocab = math.ceil(padded.vocab_size / num_device)
    vector += batch * vocab * SAMPLING_PASSES
    ops += L * (UNDECLARED_LAYER_OPS + (padded.positions == "rope")) + 1
    return Traffic(total, device, streamed, macs, kv_bytes, kv_macs, kv_elements * attended * itemsize, vector,
                    ops, tuple(s for s in syncs if num_device > 1))


def expert_share(cfg: ModelConfig, batch: int) -> float:
    """The share of an expert stack one decode step reads: k of E experts per row while batch x k < E (the
    datapath then gathers the chosen experts' matrices), all of them otherwise."""
    chosen = batch * cfg.experts_per_token
    return chosen / cfg.num_experts if chosen < cfg.num_experts else 1.0


def _logits_sync(name: str, spec: ParamSpec, shard: tuple[int, ...], shard_bytes: int, num_device: int,
                 batch: int, itemsize: int) -> list[Sync]:
    """The vocab-parallel LM head leaves each device a slice of the logits: gather them for sampling."""
    vocab = math.ceil(spec.shape[spec.axes.index("vocab")] / num_device) * num_device
    return [Sync(name, "all-gather", 1, batch * vocab * itemsize, shard_bytes, batch * math.prod(shard))]


def matrix_seconds(nbytes: int, macs: int, hw: Hardware) -> float:
    """Time of streaming `nbytes` through the matrix engine: the stream or the MACs, whichever binds."""
    return max(nbytes / (hw.memory_bandwidth_gbs * 1e9 * hw.stream_efficiency),
               macs / (hw.macs_per_cycle * hw.clock_mhz * 1e6))


def sync_cost(sync: Sync, hw: Hardware, num_device: int) -> SyncCost:
    """ESL: overlapped with the producing matrix, exposed = hop latencies + what does not fit under it."""
    n = num_device
    if sync.kind == "all-reduce":  # reduce-scatter then all-gather around the ring
        wire_bytes, steps = 2 * (n - 1) / n * sync.payload_bytes, 2 * (n - 1)
    else:
        wire_bytes, steps = (n - 1) / n * sync.payload_bytes, n - 1
    transfer = wire_bytes / (hw.esl_bandwidth_gbs * 1e9)
    overlapped = min(transfer, matrix_seconds(sync.producer_bytes, sync.producer_macs, hw))
    # The last partial sums leave when the matrix ends and cross up to n - 1 hops to the farthest device.
    exposed = (n - 1) * hw.esl_hop_latency_us * 1e-6 + transfer - overlapped
    baseline = steps * hw.baseline_alpha_us * 1e-6 + wire_bytes / (hw.baseline_link_gbs * 1e9)
    return SyncCost(sync.name, sync.kind, sync.count, sync.payload_bytes, 1e3 * sync.count * overlapped,
                    1e3 * sync.count * exposed, 1e3 * sync.count * baseline)


def check_step(config: ModelConfig | Any, num_device: int, context_len: int, batch: int, dtype: str,
               quantize: str | None) -> tuple[int, int, int, Storage, ModelConfig]:
    """The validated arguments of a decode-step estimate (LPU or GPU); bad ones raise, naming the argument."""
    num_device = check_int("num_device", num_device, minimum=1)
    context_len = check_int("context_len", context_len, minimum=0)
    batch = check_int("batch", batch, minimum=1)
    store = storage(dtype, quantize)
    config = model_config(config)
    if context_len >= config.max_position_embeddings:
        raise ValueError(f"context_len {context_len} leaves no position for the new token: {config.model_type} "
                         f"has max_position_embeddings={config.max_position_embeddings}")
    return num_device, context_len, batch, store, config


def estimate(config: ModelConfig | Any, num_device: int, context_len: int, *, preset: str | Hardware = "asic",
             batch: int = 1, dtype: str = DEFAULT_DTYPE, quantize: str | None = None) -> Estimate:
    """Estimated per-token decode latency of `config` on `num_device` LPU devices.

    Args:
      config: the model: a `ModelConfig` (as the datapath runs it; heads are padded for `num_device` here), a
        dict of config.json contents, a transformers `PretrainedConfig`, a path to a config.json,
        hdex_config.json or .gguf file or to a model directory, or a compiled or locally cached model id
        (`hdex_jax.lpu.config_source.model_config`).
      num_device: number of LPU devices the model is split over (tensor parallel, >= 1).
      context_len: tokens already in the KV cache when the token is generated (>= 0). A generation's mean
        ms/token is the estimate at its mean context (prompt + half the output), the cost being linear in it.
      preset: "asic", "fpga-u55c" (see `PRESETS`), or a `Hardware` of your own.
      batch: rows decoded together (weights are streamed once for all of them).
      dtype: storage type of activations, KV entries and weights (a float dtype or its name: "float16", the
        LPU's, "bfloat16", "float8", ...); a quantized format's name (`formats.QUANTIZED`) means `quantize`.
      quantize: None, or the format of the matrices: "int8", "int4", "q8_0", "q4_0", "q4_1" (bytes per weight
        in `hdex_jax.lpu.formats`).

    Returns:
      An `Estimate`: `ms_per_token` is the sum of `stages`; `syncs` splits each ESL sync into its overlapped
      and exposed time; `baseline_ms_per_token` is the same step with syncs not overlapped; `power_w` and
      `joules_per_token` are the server's.

    Raises:
      TypeError: for an argument of the wrong type (naming it).
      ValueError: for an unknown preset, num_device < 1, a negative context_len or one past the model's
        positions, batch < 1, an unknown dtype, or a config of an unsupported family.
      FileNotFoundError: for a config path or model id that leads to no config.
    """
    hw = get_preset(preset)
    num_device, context_len, batch, store, config = check_step(config, num_device, context_len, batch, dtype,
                                                               quantize)
    t = traffic(config, num_device, context_len, batch, store)
    syncs = tuple(sync_cost(s, hw, num_device) for s in t.syncs)
    stages = {
        "weights": 1e3 * matrix_seconds(t.weight_bytes, t.weight_macs, hw),
        "kv_cache": 1e3 * matrix_seconds(t.kv_bytes, t.kv_macs, hw),
        "vector": 1e3 * t.vector_elements / (hw.vector_lanes * hw.clock_mhz * 1e6),
        "pipeline": 1e3 * t.ops * hw.op_latency_cycles / (hw.clock_mhz * 1e6),
        "esl_sync": sum(s.exposed_ms for s in syncs),
    }
    ms = sum(stages.values())
    device_w = lpu_device_power_w(hw, (t.weight_bytes + t.kv_bytes) / (ms * 1e-3))
    return Estimate(
        model_type=config.model_type, preset=hw.name, num_device=num_device, context_len=context_len,
        batch=batch, dtype=store.name, ms_per_token=ms, power_w=server_power_w(device_w, num_device), stages=stages, syncs=syncs,
        baseline_ms_per_token=ms - stages["esl_sync"] + sum(s.baseline_ms for s in syncs),
        weight_bytes=t.total_weight_bytes, device_weight_bytes=t.device_weight_bytes,
        device_kv_cache_bytes=t.kv_cache_bytes, weight_stream_bytes=t.weight_bytes, kv_stream_bytes=t.kv_bytes,
        memory_bandwidth_gbs=hw.memory_bandwidth_gbs, memory_capacity_gb=hw.memory_capacity_gb)
