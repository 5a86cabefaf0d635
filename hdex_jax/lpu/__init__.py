"""The LPU performance model: what a decode step and a generation would cost on real LPUs, and on GPUs.

`estimate(config, num_device, context_len, preset="asic")` returns an `Estimate` (ms/token, its stages, server
power and J/token) counted from the same model description the emulated datapath runs. Presets are plain
`Hardware` data: "asic" (the LPU of arXiv 2408.07326, calibrated against its published results) and
"fpga-u55c" (the Alveo U55C card the LPU was prototyped on). `gpu_estimate` costs the same step on GPUs
("h100", "l4", "a100": `Gpu` presets whose software costs are fitted to published GPU measurements);
`compare` puts them side by side; `lpu_prefill`, `gpu_prefill` and `end_to_end` cost the prompt pass and a
whole generation, the hybrid `device_map={"gpu": G, "lpu": L}` included. See docs/lpu_performance_model.md.
"""

from hdex_jax.lpu.formats import DEFAULT_DTYPE, QUANTIZED, Storage, storage
from hdex_jax.lpu.gpu import GpuEstimate, achieved_bandwidth_gbs, gpu_estimate
from hdex_jax.lpu.latency import Estimate, SyncCost, estimate
from hdex_jax.lpu.prefill import EndToEnd, Prefill, end_to_end, gpu_end_to_end, gpu_prefill, lpu_prefill
from hdex_jax.lpu.presets import (ASIC, FPGA_U55C, GPU_PRESETS, H100_SXM, L4, PRESETS, Gpu, Hardware, get_gpu,
                                  get_preset)
from hdex_jax.lpu.report import (Comparison, compare, end_to_end_table, format_comparison, format_end_to_end,
                                 format_table, plot_comparison, plot_scaling, scaling, write_csv)

__all__ = ["ASIC", "Comparison", "DEFAULT_DTYPE", "EndToEnd", "Estimate", "FPGA_U55C", "GPU_PRESETS", "Gpu",
           "GpuEstimate", "H100_SXM", "Hardware", "L4", "PRESETS", "Prefill", "QUANTIZED", "Storage", "SyncCost",
           "achieved_bandwidth_gbs", "compare", "end_to_end", "end_to_end_table", "estimate", "format_comparison",
           "format_end_to_end", "format_table", "get_gpu", "get_preset", "gpu_end_to_end", "gpu_estimate",
           "gpu_prefill", "lpu_prefill", "plot_comparison", "plot_scaling", "scaling", "storage", "write_csv"]
