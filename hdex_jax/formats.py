"""The number format a model is compiled in: `dtype` and `quantize` -> how each weight is stored.

- `dtype` ("float32", "float16", "bfloat16"): activations, the KV cache and every weight not quantized.
- `quantize`:
  - "auto" (default): weights the checkpoint stores quantized in a kept format (GGUF Q8_0, Q4_0, Q4_1) stay
    exactly as stored, the embedding and a tied LM head included; the others are stored in `dtype`;
  - None: every weight in `dtype` (a GGUF file's blocks dequantized);
  - "int8" (symmetric, per output channel) or "int4" (affine, groups of 32), computed by hdex_jax from the
    weights' values: every projection; the embedding, the LM head, norms and routers stay in `dtype`.
Fused groups (q/k/v, gate/up) share one format; a weight whose input features do not split into whole groups
stays in `dtype`.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import jax.numpy as jnp
import numpy as np

from hdex_jax import quant
from hdex_jax.config import DTYPES, ModelConfig
from hdex_jax.params import FUSED, flatten, param_specs

QUANTIZE = ("auto", None, "int8", "int4")
# Weights "int8"/"int4" leave in dtype: the token table (read a row at a time), the LM head, MoE routers.
_NOT_QUANTIZED = ("embed", "lm_head/w", "layers/moe/router/w")


def check_format(dtype: Any, quantize: Any) -> tuple[str, str | None]:
    """`(dtype, quantize)` checked, or ValueError naming the argument and what it accepts."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(repr, DTYPES))}, got {dtype!r}")
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {', '.join(map(repr, QUANTIZE))}, got {quantize!r}")
    return dtype, quantize


def describe(cfg: ModelConfig) -> str:
    """One line for the user: the dtype and the weights' formats, e.g. "float32; quantized: q4_1 for 7 weights,
    q8_0 for 1 weight" (a stacked per-layer weight counts once)."""
    counts: dict[str, int] = {}
    for _, fmt in cfg.weight_formats:
        counts[fmt] = counts.get(fmt, 0) + 1
    kept = ", ".join(f"{fmt} for {n} weight{'s' * (n != 1)}" for fmt, n in sorted(counts.items()))
    return cfg.dtype + (f"; quantized: {kept}" if kept else "")


def _groups_fit(spec: Any, fmt: str) -> bool:
    group = quant.FORMATS[fmt].group
    return group is None or spec.shape[spec.packed_axis] % group == 0


def compiled_config(stored: ModelConfig, dtype: str, quantize: str | None) -> ModelConfig:
    """The config of a model compiled in (`dtype`, `quantize`) from a checkpoint whose config `stored` names the
    formats it stores (`ModelConfig.weight_formats`)."""
    dtype, quantize = check_format(dtype, quantize)
    specs = flatten(param_specs(dataclasses.replace(stored, weight_formats=())))
    if quantize == "auto":
        formats = dict(stored.weight_formats)
    elif quantize is None:
        formats = {}
    else:
        formats = {name: quantize for name, spec in specs.items()
                   if spec.inputs and name not in _NOT_QUANTIZED and _groups_fit(spec, quantize)}
    for block, (_, parts) in FUSED.items():
        for prefix in ("layers/", "layers/moe/"):
            names = [f"{prefix}{block}/{part}/w" for part in parts]
            present = [n for n in names if n in specs]
            if len(present) == len(names) and len({formats.get(n) for n in present}) > 1:
                shown = ", ".join(f"{n}: {formats.get(n) or dtype}" for n in present)
                print(f"[hdex] the fused weights {shown} differ in format; storing them in {dtype}",
                      file=sys.stderr, flush=True)
                for n in present:
                    formats.pop(n, None)
    return dataclasses.replace(stored, dtype=dtype, weight_formats=tuple(sorted(formats.items())))


def convert_params(flat: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    """Canonical flat params (float32 numpy or stored QuantArrays) -> the formats `cfg` declares: kept blocks
    as they are, others quantized from their values, the rest cast to `cfg.dtype`."""
    out = {}
    for name, spec in flatten(param_specs(cfg)).items():
        value = flat[name]
        if spec.format is None:
            value = quant.dequantize_np(value) if quant.is_quant(value) else value
            out[name] = np.asarray(value).astype(jnp.dtype(cfg.dtype))
        elif quant.is_quant(value) and value.format == spec.format:
            out[name] = value
        else:
            values = quant.dequantize_np(value) if quant.is_quant(value) else value
            out[name] = quant.quantize(values, spec.format, spec.packed_axis, spec.inputs)
    return out


def manifest_fields(cfg: ModelConfig, quantize: str | None) -> dict[str, Any]:
    """What a `param/` manifest records of the format of `cfg` (a `compiled_config`)."""
    return {"dtype": cfg.dtype, "quantize": quantize, "weight_formats": [list(item) for item in cfg.weight_formats]}


def from_manifest(stored: ModelConfig, manifest: dict[str, Any]) -> ModelConfig:
    """The compiled config of a `param/` directory from its manifest (written by an hdex_jax that records
    formats; older ones compiled float32 only)."""
    return dataclasses.replace(stored, dtype=manifest.get("dtype", "float32"),
                               weight_formats=tuple(tuple(item) for item in manifest.get("weight_formats", ())))


def same_format(manifest: dict[str, Any] | None, dtype: str, quantize: str | None) -> bool:
    """Whether a `param/` manifest was compiled in (`dtype`, `quantize`)."""
    return manifest is not None and "weight_formats" in manifest and (
        manifest["dtype"], manifest["quantize"]) == (dtype, quantize)
