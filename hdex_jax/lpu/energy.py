"""Power of LPU and GPU servers while they decode, hence joules per token.

A server of N devices draws, at the wall, (N x (device power + host share)) / PSU efficiency. Device power:

- LPU: core power (the paper's 284.31 mW for the ASIC) + memory power (bits streamed per second x energy per
  bit) + the card's static power; every term but the core's is an assumption tagged in `presets.py`;
- GPU: idle power + (board power - idle) x bandwidth utilisation. At batch 1 a GPU waits on memory, so its
  draw is taken to follow how hard the memory streams, reaching the board power (TDP) at the peak.

The host share (CPUs, DRAM, NICs and fans divided over the devices) and the PSU efficiency are the same
for both kinds of server, so they dilute a ratio of efficiencies but never reverse it.
"""

from __future__ import annotations

from hdex_jax.lpu.presets import Gpu, Hardware

# [assumption] Host power per device slot: between a lean inference host's share (~50 W) and a DGX H100's
# 10.2 kW maximum less its eight GPUs' 5.6 kW (~575 W per GPU, at full load).
HOST_W_PER_DEVICE = 150.0
# [assumption] An 80 PLUS Titanium-class supply at typical load.
PSU_EFFICIENCY = 0.94


def lpu_device_power_w(hw: Hardware, streamed_bytes_per_s: float) -> float:
    """Power of one LPU card that streams `streamed_bytes_per_s` from its memory."""
    return hw.core_power_w + hw.board_static_w + hw.memory_pj_per_bit * 1e-12 * 8 * streamed_bytes_per_s


def gpu_device_power_w(gpu: Gpu, bandwidth_utilization: float) -> float:
    """Power of one GPU whose memory streams at `bandwidth_utilization` of its peak."""
    return gpu.idle_power_w + (gpu.board_power_w - gpu.idle_power_w) * min(1.0, bandwidth_utilization)


def server_power_w(device_power_w: float, num_device: int) -> float:
    """Wall power of a server of `num_device` devices each drawing `device_power_w`."""
    return num_device * (device_power_w + HOST_W_PER_DEVICE) / PSU_EFFICIENCY
