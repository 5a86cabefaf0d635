"""The LPU performance model: what a decode step would cost on real LPU hardware.

`estimate(config, num_device, context_len, preset="asic")` returns an `Estimate` (ms/token and its stages)
counted from the same model description the emulated datapath runs. Presets are plain `Hardware` data:
"asic" (the LPU of arXiv 2408.07326, calibrated against its published results) and "fpga-u55c" (the Alveo
U55C card the LPU was prototyped on). See docs/lpu_performance_model.md.
"""

from hdex_jax.lpu.model import DEFAULT_DTYPE, Estimate, SyncCost, estimate
from hdex_jax.lpu.presets import ASIC, FPGA_U55C, PRESETS, Hardware, get_preset
from hdex_jax.lpu.report import format_table, plot_scaling, scaling, write_csv

__all__ = ["ASIC", "DEFAULT_DTYPE", "Estimate", "FPGA_U55C", "Hardware", "PRESETS", "SyncCost", "estimate",
           "format_table", "get_preset", "plot_scaling", "scaling", "write_csv"]
