"""Scaling sweeps of the LPU performance model as a table, a CSV file and a speedup plot."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from hdex_jax.config import ModelConfig
from hdex_jax.lpu.config_source import model_config
from hdex_jax.lpu.model import DEFAULT_DTYPE, Estimate, estimate
from hdex_jax.lpu.presets import Hardware
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
    ("baseline_ms_per_token", "GPU-style ms/token", "{:.3f}"),
    ("baseline_speedup", "GPU-style speedup", "{:.2f}x"),
    ("fits_in_memory", "fits", "{}"),
)


def scaling(config: ModelConfig | Any, devices: Sequence[int], context_len: int, *,
            preset: str | Hardware = "asic", batch: int = 1, dtype: str = DEFAULT_DTYPE) -> list[Estimate]:
    """One estimate per device count, in the order given; `config` is anything `estimate` takes."""
    if isinstance(devices, (str, bytes)) or not isinstance(devices, Sequence):
        raise TypeError(f"devices must be a list of device counts, got {quote(devices)} ({type(devices).__name__})")
    if not devices:
        raise ValueError("devices is empty: give at least one device count")
    config = model_config(config)
    return [estimate(config, n, context_len, preset=preset, batch=batch, dtype=dtype) for n in devices]


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
            **{f"{stage}_ms": ms for stage, ms in e.stages.items()},
        })
    return out


def format_table(estimates: Sequence[Estimate]) -> str:
    """The sweep as an aligned text table."""
    cells = [[header for _, header, _ in _PRINTED]]
    cells += [[fmt.format(row[key]) for key, _, fmt in _PRINTED] for row in rows(estimates)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(_PRINTED))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in cells)


def write_csv(estimates: Sequence[Estimate], path: str | Path) -> None:
    records = rows(estimates)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


def plot_scaling(estimates: Sequence[Estimate], path: str | Path | None = None, *, title: str = "") -> Figure:
    """Speedup against device count: the LPU with ESL, the ideal line and the GPU-style baseline.

    Saved as PNG to `path` when given. Built on a bare `Figure`, so no GUI backend or pyplot state is needed.
    """
    records = rows(estimates)
    devices = [r["devices"] for r in records]
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    ax.plot(devices, [r["ideal_speedup"] for r in records], "k--", label="ideal (linear)")
    ax.plot(devices, [r["speedup"] for r in records], "o-", label="LPU, ESL overlapped sync")
    ax.plot(devices, [r["baseline_speedup"] for r in records], "s-",
            label="GPU-style, ring all-reduce not overlapped")
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
