"""Hardware presets of the LPU performance model: plain frozen data, one number per field. `Hardware` is an
LPU device (presets "asic", "fpga-u55c"); `Gpu` a GPU it is compared with ("h100", "l4", and "a100", on which
the GPU model's software costs are fitted).

Every value is tagged in a comment with where it comes from:

- [paper]       arXiv 2408.07326 / IEEE Micro 44(6) 2024, "LPU: A Latency-Optimized and Highly Scalable
                Processor for Large Language Model Inference" (Moon et al., HyperAccel and KAIST);
- [datasheet]   the vendor's product page of the part named;
- [derived]     computed from tagged numbers, the derivation is in the comment;
- [calibrated]  fitted so that the model reproduces the published results (see `hdex_jax.lpu.calibration`
                and docs/lpu_performance_model.md, which show the fit and its error);
- [assumption]  not published as far as this project could verify: a stated guess, to be replaced when a
                better number is known.

To model other hardware, copy a preset and change it:
`dataclasses.replace(ASIC, memory_bandwidth_gbs=4800.0, name="asic-hbm3e")`, then pass it as `preset=`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hdex_jax.validation import quote


def _check_numbers(preset: Hardware | Gpu, fractions: tuple[str, ...]) -> None:
    """Raise naming the field unless every field but the name is positive, and `fractions` at most 1."""
    kind = type(preset).__name__
    for field in dataclasses.fields(preset):
        value = getattr(preset, field.name)
        if field.name != "name" and (isinstance(value, bool) or not value > 0):
            raise ValueError(f"{kind}.{field.name} must be positive, got {value!r}")
    for name in fractions:
        if getattr(preset, name) > 1:
            raise ValueError(f"{kind}.{name} is a fraction of the peak, got {getattr(preset, name)}")


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One LPU device, its memory and its device-to-device links.

    Units are those in the field names: GB is 1e9 bytes, GB/s is 1e9 bytes per second.
    """

    name: str
    # Peak memory bandwidth of one device.
    memory_bandwidth_gbs: float
    # Memory capacity of one device: weights plus KV cache must fit (reported, not enforced).
    memory_capacity_gb: float
    # Fraction of the peak bandwidth sustained while weights and KV entries stream through the datapath.
    stream_efficiency: float
    # Kernel clock of the datapath.
    clock_mhz: float
    # Multiply-accumulates per cycle of the matrix engine (one batch row): bounds compute-heavy steps.
    macs_per_cycle: int
    # Elements per cycle of the vector engine (norms, softmax, activations, residual adds, sampling).
    vector_lanes: int
    # Cycles every dependent instruction waits before its first result (memory latency, pipeline fill and
    # drain). A decode step is one long chain of such instructions, so this is paid once per instruction.
    op_latency_cycles: int
    # Bandwidth of one ESL (expandable synchronization link) direction between neighbouring devices.
    esl_bandwidth_gbs: float
    # Latency of one ESL hop: paid per hop even when the transfer itself overlaps compute.
    esl_hop_latency_us: float
    # The GPU-style baseline: a ring all-reduce that does not overlap compute, costing
    # 2 (N - 1) (alpha + bytes / (N beta)) per all-reduce (the alpha-beta model).
    baseline_alpha_us: float
    baseline_link_gbs: float
    # Bandwidth of one direction of the link to the host (and to a GPU beside it: the hybrid's KV transfer).
    host_link_gbs: float
    # Power of the datapath itself (the processor core) while it decodes.
    core_power_w: float
    # Energy of moving one bit between memory and the datapath (DRAM array, PHY and controller).
    memory_pj_per_bit: float
    # Power the card draws whatever it does: memory refresh and static power, regulators, PCIe, fans.
    board_static_w: float

    def __post_init__(self) -> None:
        _check_numbers(self, fractions=("stream_efficiency",))


ASIC = Hardware(
    name="asic",
    # [calibrated] Not stated in the material this project could verify. The published OPT-66B result
    # (20.9 ms/token on two devices, fp16) alone needs >= 3.14 TB/s per device at 100% efficiency, so one
    # HBM3 stack (819.2 GB/s), and the H100 SXM's 3.35 TB/s at the published ~90% efficiency, are both ruled
    # out. Fitting both published latencies with stream_efficiency at 0.90 gives 3806 GB/s, rounded here;
    # that is within 3% of the 3.9 TB/s of an H100 NVL (HBM3), the GPU class the paper compares against.
    memory_bandwidth_gbs=3800.0,
    # [assumption] HBM3 capacity of the H100 class the paper compares against: OPT-66B in fp16 (131 GB)
    # needs two such devices, as in the paper.
    memory_capacity_gb=80.0,
    # [paper] "up to 90% bandwidth utilization": the streaming efficiency a large model approaches.
    stream_efficiency=0.90,
    # [assumption] ASIC clock of the 4 nm synthesis (the paper gives area and power, not a clock we verified).
    clock_mhz=1000.0,
    # [derived] [paper: compute balanced to memory bandwidth] 3800 GB/s / 2 bytes / 1 GHz = 1900 fp16
    # weights per cycle, rounded up to a power of two.
    macs_per_cycle=2048,
    # [assumption] Vector engine width.
    vector_lanes=64,
    # [calibrated] Fitted with memory_bandwidth_gbs to both published latencies (1078 cycles, rounded): what
    # makes OPT-1.3B (many short instructions) use its bandwidth less well than OPT-66B.
    op_latency_cycles=1080,
    # [assumption] Per-direction ESL bandwidth of the ASIC (a PCIe 5.0 x16-class serial link).
    esl_bandwidth_gbs=64.0,
    # [calibrated] A round value that gives the published ~1.75x per doubling (OPT-66B, 2 to 8 devices).
    esl_hop_latency_us=1.0,
    # [assumption] NCCL-like ring step latency and NVLink-class link of the GPU servers compared against.
    baseline_alpha_us=2.0,
    baseline_link_gbs=200.0,
    # [assumption] A PCIe 5.0 x16 card: 64 GB/s per direction.
    host_link_gbs=64.0,
    # [paper] "power consumption of 284.31 mW" for the synthesized 4 nm LPU core.
    core_power_w=0.28431,
    # [assumption] HBM3 access energy including PHY and controller: published HBM2/HBM2E/HBM3 figures are
    # 3-4 pJ/bit, the upper end taken here.
    memory_pj_per_bit=4.0,
    # [assumption] Static power of the HBM stacks, regulators and PCIe of an 80 GB accelerator card.
    board_static_w=40.0,
)

# [assumption] Otherwise the ASIC's streamlined datapath and RTL: the same stream_efficiency, vector_lanes and
# op_latency_cycles (the same cycle counts, at a lower clock). Values grouped by source, as the GPU presets are.
FPGA_U55C = dataclasses.replace(
    ASIC,
    name="fpga-u55c",
    # [datasheet] AMD/Xilinx Alveo U55C: 16 GB HBM2 at 460 GB/s; QSFP28 ports at 100 Gb/s = 12.5 GB/s per
    # direction, which ESL uses; a PCIe Gen3 x16 host interface, about 16 GB/s per direction. [paper] The LPU
    # prototype runs on this card.
    memory_bandwidth_gbs=460.0, memory_capacity_gb=16.0, esl_bandwidth_gbs=12.5, host_link_gbs=16.0,
    # [paper] 220 MHz kernel clock on the U55C.
    clock_mhz=220.0,
    # [derived] [paper: compute balanced to memory bandwidth] 460 GB/s / 2 bytes / 220 MHz = 1045 fp16
    # weights per cycle: 1024 MACs keep up with the 90% of it that is sustained.
    macs_per_cycle=1024,
    # [assumption] One ESL hop through two 100G MACs and a cable; the baseline, a host-driven ring all-reduce over
    # the same 100G links.
    esl_hop_latency_us=1.0, baseline_alpha_us=2.0, baseline_link_gbs=12.5,
    # [assumption] FPGA fabric, clocking and transceivers running the LPU at 220 MHz; HBM2 access energy including
    # PHY and controller; static power of the card (HBM2, regulators, QSFP cages), whose maximum is 150 W.
    core_power_w=50.0, memory_pj_per_bit=4.0, board_static_w=25.0,
)

PRESETS: dict[str, Hardware] = {hw.name: hw for hw in (ASIC, FPGA_U55C)}


@dataclasses.dataclass(frozen=True)
class Gpu:
    """One GPU, its links and power, and the costs that make it slow at batch 1 (see `hdex_jax.lpu.gpu`).

    Units are those in the field names; `stream_efficiency`, `kernel_overhead_us` and `allreduce_latency_us`
    are the software's, fitted once (`GPU_SOFTWARE`) and shared by every GPU preset.
    """

    name: str
    memory_bandwidth_gbs: float
    memory_capacity_gb: float
    # Dense (no sparsity) float16/bfloat16 tensor-core peak.
    peak_tflops: float
    # One direction of the GPU-to-GPU link the all-reduces use (NVLink, or PCIe when there is none).
    link_gbs: float
    # One direction of the host PCIe link (the hybrid's KV transfer to the LPU).
    host_link_gbs: float
    # Maximum board power (TDP), drawn in full when the memory streams at its peak.
    board_power_w: float
    # Board power of an idle GPU with its memory and clocks up.
    idle_power_w: float
    # Fraction of the peak bandwidth a large matrix-vector kernel sustains.
    stream_efficiency: float
    # Fixed time per kernel on the critical path: launch (from a CUDA graph), synchronisation, ramp-up and tail.
    kernel_overhead_us: float
    # Fixed time of one NCCL all-reduce (or gather) of a small vector; compute waits for it.
    allreduce_latency_us: float
    # Fraction of `peak_tflops` a prompt pass (large matrix products) achieves.
    prefill_mfu: float

    def __post_init__(self) -> None:
        _check_numbers(self, fractions=("stream_efficiency", "prefill_mfu"))


# [calibrated] The batch-1 software of the GPUs: fitted to gpt-fast's published A100 decode measurements
# (`hdex_jax.lpu.calibration.GPU_POINTS`, fit in `calibration.fit_gpu`), rounded; none of the LPU paper's figures
# is used. prefill_mfu is an [assumption]: half the dense peak, typical of large prompt passes.
GPU_SOFTWARE = {"stream_efficiency": 0.80, "kernel_overhead_us": 2.7, "allreduce_latency_us": 6.4,
                "prefill_mfu": 0.5}

A100_SXM = Gpu(
    name="a100",
    # [datasheet] NVIDIA A100 80GB SXM: 2039 GB/s HBM2e, 80 GB, 312 TFLOPS dense fp16/bf16 tensor, NVLink 3
    # 600 GB/s (300 per direction), PCIe Gen4 64 GB/s (32 per direction), 400 W.
    memory_bandwidth_gbs=2039.0, memory_capacity_gb=80.0, peak_tflops=312.0, link_gbs=300.0,
    host_link_gbs=32.0, board_power_w=400.0,
    # [assumption] Idle with memory clocks up.
    idle_power_w=55.0,
    **GPU_SOFTWARE,
)

H100_SXM = Gpu(
    name="h100",
    # [datasheet] NVIDIA H100 SXM5 80GB: 3.35 TB/s HBM3, 80 GB, 989 TFLOPS dense fp16/bf16 tensor (1979 with
    # sparsity), NVLink 4 900 GB/s (450 per direction), PCIe Gen5 128 GB/s (64 per direction), up to 700 W.
    memory_bandwidth_gbs=3350.0, memory_capacity_gb=80.0, peak_tflops=989.0, link_gbs=450.0,
    host_link_gbs=64.0, board_power_w=700.0,
    # [assumption] Idle with memory clocks up.
    idle_power_w=70.0,
    **GPU_SOFTWARE,
)

L4 = Gpu(
    name="l4",
    # [datasheet] NVIDIA L4: 300 GB/s GDDR6, 24 GB, 121 TFLOPS dense fp16 tensor (242 with sparsity), no
    # NVLink: GPU-to-GPU and host over PCIe Gen4 x16, 64 GB/s (32 per direction), 72 W.
    memory_bandwidth_gbs=300.0, memory_capacity_gb=24.0, peak_tflops=121.0, link_gbs=32.0,
    host_link_gbs=32.0, board_power_w=72.0,
    # [assumption] Idle with memory clocks up.
    idle_power_w=16.0,
    **GPU_SOFTWARE,
)

GPU_PRESETS: dict[str, Gpu] = {gpu.name: gpu for gpu in (H100_SXM, L4, A100_SXM)}


def get_gpu(gpu: str | Gpu) -> Gpu:
    """`gpu` itself when it is a `Gpu`, else the GPU preset of that name."""
    return _preset("gpu", gpu, GPU_PRESETS, "a", "GPU")


def get_preset(preset: str | Hardware) -> Hardware:
    """`preset` itself when it is a `Hardware`, else the preset of that name."""
    return _preset("preset", preset, PRESETS, "an", "LPU")


def _preset(argument: str, value: Any, presets: dict[str, Any], article: str, kind: str) -> Any:
    """`value` itself when it is of the presets' class, else the preset of that name; errors name `argument` and
    the presets of `kind` ("LPU", "GPU", after `article`)."""
    cls = type(next(iter(presets.values())))
    if isinstance(value, cls):
        return value
    known = ", ".join(presets)
    if not isinstance(value, str):
        raise TypeError(f"{argument} must be the name of {article} {kind} preset ({known}) or a "
                        f"hdex_jax.lpu.{cls.__name__}, got {quote(value)} ({type(value).__name__})")
    if value not in presets:
        raise ValueError(f"unknown {kind} preset {value!r}; known {kind} presets: {known} "
                         f"(or pass a hdex_jax.lpu.{cls.__name__})")
    return presets[value]
