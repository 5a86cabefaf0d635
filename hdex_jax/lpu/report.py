"""Scaling sweeps of the LPU performance model as a table, a CSV file and a speedup plot; the LPU beside GPUs
(`compare`) as a table and a plot; generations end to end (`end_to_end_table`)."""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from hdex_jax.config import ModelConfig
from hdex_jax.lpu.config_source import model_config
from hdex_jax.lpu.formats import DEFAULT_DTYPE
from hdex_jax.lpu.gpu import GpuEstimate, gpu_estimate
from hdex_jax.lpu.latency import Estimate, StepFigures, estimate
from hdex_jax.lpu.prefill import EndToEnd, end_to_end, gpu_end_to_end
from hdex_jax.lpu.presets import Gpu, Hardware, get_gpu
from hdex_jax.validation import quote

# (CSV column, printed header, format) of each row; speedups are relative to the first device count.
_PRINTED = (
    ("devices", "devices", "{:d}"),
    ("ms_per_token", "ms/token", "{:.3f}"),
    ("tokens_per_s", "tokens/s", "{:.1f}"),
    ("speedup", "speedup", "{:.2f}x"),
    ("bandwidth_utilization", "BW util", "{:.1%}"),
    ("esl_exposed_ms", "ESL exposed ms", "{:.3f}"),
    ("esl_overlapped_ms", "ESL hidden ms", "{:.3f}"),
    ("baseline_ms_per_token", "sync not overlapped ms/token", "{:.3f}"),
    ("baseline_speedup", "its speedup", "{:.2f}x"),
    ("fits_in_memory", "fits", "{}"),
)


def _check_devices(devices: Sequence[int]) -> None:
    if isinstance(devices, (str, bytes)) or not isinstance(devices, Sequence):
        raise TypeError(f"devices must be a list of device counts, got {quote(devices)} ({type(devices).__name__})")
    if not devices:
        raise ValueError("devices is empty: give at least one device count")


def scaling(config: ModelConfig | Any, devices: Sequence[int], context_len: int, *,
            preset: str | Hardware = "asic", batch: int = 1, dtype: str = DEFAULT_DTYPE,
            quantize: str | None = None) -> list[Estimate]:
    """One estimate per device count, in the order given; `config` is anything `estimate` takes."""
    _check_devices(devices)
    config = model_config(config)
    return [estimate(config, n, context_len, preset=preset, batch=batch, dtype=dtype, quantize=quantize)
            for n in devices]


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The LPU and each GPU at one device count: `speedup` and `efficiency` are the LPU's over each GPU's."""

    num_device: int
    lpu: Estimate
    gpus: dict[str, GpuEstimate]

    def speedup(self, gpu: str) -> float:
        """How many times faster the LPUs generate a token than the GPUs (same device count)."""
        return self.gpus[gpu].ms_per_token / self.lpu.ms_per_token

    def efficiency(self, gpu: str) -> float:
        """How many times more tokens per joule the LPU server makes than the GPU server."""
        return self.lpu.tokens_per_joule / self.gpus[gpu].tokens_per_joule


def compare(config: ModelConfig | Any, devices: Sequence[int], context_len: int, *,
            preset: str | Hardware = "asic", gpus: Sequence[str | Gpu] = ("h100", "l4"), batch: int = 1,
            dtype: str = DEFAULT_DTYPE, quantize: str | None = None) -> list[Comparison]:
    """The LPU (`preset`) beside each of `gpus` at every device count: what `hdex estimate --compare` prints."""
    _check_devices(devices)
    if isinstance(gpus, (str, bytes)) or not isinstance(gpus, Sequence):
        raise TypeError(f"gpus must be a list of GPU presets such as ['h100', 'l4'], got {quote(gpus)}")
    if not gpus:
        raise ValueError("gpus is empty: give at least one GPU preset")
    config = model_config(config)
    kinds = [get_gpu(g) for g in gpus]
    return [Comparison(n, estimate(config, n, context_len, preset=preset, batch=batch, dtype=dtype,
                                   quantize=quantize),
                       {g.name: gpu_estimate(config, n, context_len, gpu=g, batch=batch, dtype=dtype,
                                             quantize=quantize) for g in kinds})
            for n in devices]


def _aligned(cells: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in cells)


def _figures(device: str, e: StepFigures, speedup: float, efficiency: float) -> list[str]:
    return [device, f"{e.ms_per_token:.3f}", f"{e.tokens_per_s:.1f}", f"{e.joules_per_token:.4g}",
            f"{e.power_w:.0f}", f"{e.bandwidth_utilization:.1%}", f"{speedup:.2f}x", f"{efficiency:.2f}x",
            str(e.fits_in_memory)]


def format_comparison(comparisons: Sequence[Comparison]) -> str:
    """One line per device count and device: ms/token, tokens/s, J/token, server W, bandwidth used, and the
    LPU's speedup and energy efficiency over that device (1.00x on the LPU's own line)."""
    cells = [["devices", "device", "ms/token", "tokens/s", "J/token", "server W", "BW util", "LPU speedup",
              "LPU efficiency", "fits"]]
    for c in comparisons:
        cells.append([str(c.num_device), *_figures(c.lpu.preset, c.lpu, 1.0, 1.0)])
        cells += [[str(c.num_device), *_figures(name, g, c.speedup(name), c.efficiency(name))]
                  for name, g in c.gpus.items()]
    return _aligned(cells)


def plot_comparison(comparisons: Sequence[Comparison], path: str | Path | None = None, *,
                    title: str = "") -> Figure:
    """ms/token and J/token against device count, the LPU and each GPU (log scales); PNG to `path` if given."""
    devices = [c.num_device for c in comparisons]
    series = {comparisons[0].lpu.preset: [c.lpu for c in comparisons]}
    series.update({name: [c.gpus[name] for c in comparisons] for name in comparisons[0].gpus})
    fig = Figure(figsize=(9.6, 4.2))
    for i, (attr, label) in enumerate((("ms_per_token", "ms/token"), ("joules_per_token", "J/token (server)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for name, estimates in series.items():
            ax.plot(devices, [getattr(e, attr) for e in estimates], "o-", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(devices, [str(n) for n in devices])
        ax.set_xlabel("devices")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title or f"{comparisons[0].lpu.model_type}: LPU beside GPUs", fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def end_to_end_table(config: ModelConfig | Any, devices: Sequence[int], prompt_len: int, output_len: int, *,
                     preset: str | Hardware = "asic", gpu: str | Gpu = "h100", dtype: str = DEFAULT_DTYPE,
                     quantize: str | None = None) -> list[EndToEnd]:
    """For each device count n: the generation on n LPUs, on n GPUs, and the hybrid {"gpu": n, "lpu": n}."""
    _check_devices(devices)
    config = model_config(config)
    kw = {"dtype": dtype, "quantize": quantize}
    out = []
    for n in devices:
        out.append(end_to_end(config, prompt_len, output_len, {"lpu": n}, preset=preset, **kw))
        out.append(gpu_end_to_end(config, prompt_len, output_len, n, gpu=gpu, **kw))
        out.append(end_to_end(config, prompt_len, output_len, {"gpu": n, "lpu": n}, preset=preset, gpu=gpu, **kw))
    return out


def format_end_to_end(results: Sequence[EndToEnd]) -> str:
    """One line per placement: time to first token, KV transfer, decode, and the whole generation."""
    cells = [["device_map", "prefill on", "TTFT ms", "KV transfer ms", "decode ms/token", "total ms"]]
    cells += [[",".join(f"{k}:{v}" for k, v in r.device_map.items()), r.prefill.device, f"{r.ttft_ms:.3f}",
               f"{r.transfer_ms:.3f}", f"{r.decode_ms_per_token:.3f}", f"{r.total_ms:.1f}"] for r in results]
    return _aligned(cells)


def rows(estimates: Sequence[Estimate]) -> list[dict[str, float | int | bool]]:
    """Flat records of a sweep: the printed columns, the ideal speedup and every stage in ms."""
    first = estimates[0]
    out = []
    for e in estimates:
        out.append({
            "devices": e.num_device,
            "ms_per_token": e.ms_per_token,
            "tokens_per_s": e.tokens_per_s,
            "speedup": first.ms_per_token / e.ms_per_token,
            "ideal_speedup": e.num_device / first.num_device,
            "bandwidth_utilization": e.bandwidth_utilization,
            "esl_exposed_ms": e.sync_exposed_ms,
            "esl_overlapped_ms": e.sync_overlapped_ms,
            "baseline_ms_per_token": e.baseline_ms_per_token,
            "baseline_speedup": first.baseline_ms_per_token / e.baseline_ms_per_token,
            "fits_in_memory": e.fits_in_memory,
            "joules_per_token": e.joules_per_token,
            "server_power_w": e.power_w,
            **{f"{stage}_ms": ms for stage, ms in e.stages.items()},
        })
    return out


def format_table(estimates: Sequence[Estimate]) -> str:
    """The sweep as an aligned text table."""
    cells = [[header for _, header, _ in _PRINTED]]
    cells += [[fmt.format(row[key]) for key, _, fmt in _PRINTED] for row in rows(estimates)]
    return _aligned(cells)


def write_csv(estimates: Sequence[Estimate], path: str | Path) -> None:
    records = rows(estimates)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


def plot_scaling(estimates: Sequence[Estimate], path: str | Path | None = None, *, title: str = "") -> Figure:
    """Speedup against device count: the LPU with ESL, the ideal line and the LPU with syncs not overlapped.

    Saved as PNG to `path` when given. Built on a bare `Figure`, so no GUI backend or pyplot state is needed.
    """
    records = rows(estimates)
    devices = [r["devices"] for r in records]
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    ax.plot(devices, [r["ideal_speedup"] for r in records], "k--", label="ideal (linear)")
    ax.plot(devices, [r["speedup"] for r in records], "o-", label="LPU, ESL overlapped sync")
    ax.plot(devices, [r["baseline_speedup"] for r in records], "s-",
            label="LPU, ring all-reduce not overlapped")
    ax.set_xticks(devices, [str(n) for n in devices])
    ax.set_xlabel("devices")
    ax.set_ylabel(f"speedup over {devices[0]} device{'s' if devices[0] > 1 else ''}")
    ax.set_title(title or f"{estimates[0].model_type} on preset {estimates[0].preset}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
