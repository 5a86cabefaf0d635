"""Bytes per stored weight of every storage format the performance model knows: the one table of it.

Floating-point formats store each value in its numpy itemsize. Quantized formats store a matrix's values in
fewer bits plus float16 scales (and, for affine formats, float16 offsets), as `hdex_jax.quant.FORMATS`
declares them; their bytes are taken from there, not retyped:

| name | bytes per weight |
| --- | --- |
| float32 | 4 |
| float16, bfloat16 | 2 |
| float8 (float8_e4m3fn), float8_e5m2 | 1 |
| int8 | 1 + 2 / inputs (one float16 scale per output channel) |
| q8_0 | 34 / 32 (GGUF Q8_0: 32 int8 and a float16 scale) |
| q4_1, int4 | 20 / 32 (32 4-bit values, a float16 scale and a float16 min per group of 32) |
| q4_0 | 18 / 32 (32 4-bit values and a float16 scale) |

A quantized format applies to the matrices (every declared weight but norms, biases and ALiBi slopes); the
rest of the model, the KV cache and the activations keep the float dtype (float16 by default).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from hdex_jax.params import ParamSpec
from hdex_jax.quant import FORMATS
from hdex_jax.validation import quote

DEFAULT_DTYPE = "float16"  # the LPU stores and streams fp16 weights and KV entries
QUANTIZED = tuple(FORMATS)  # q8_0, q4_0, q4_1, int8, int4
# Short names of the float formats a user types, resolved to numpy (ml_dtypes) names.
FLOAT_ALIASES = {"float8": "float8_e4m3fn", "fp8": "float8_e4m3fn", "fp16": "float16", "bf16": "bfloat16",
                 "fp32": "float32"}
# Axes that stack independent matrices (one per layer, one per expert): neither inputs nor outputs.
STACK_AXES = frozenset({"layers", "experts"})


@dataclasses.dataclass(frozen=True)
class Storage:
    """How a model is stored: `dtype` for activations, KV entries and unquantized weights; `quantize` (None or
    a name of `QUANTIZED`) for its matrices."""

    dtype: str = DEFAULT_DTYPE
    quantize: str | None = None

    @property
    def itemsize(self) -> int:
        """Bytes of one activation or KV entry."""
        return np.dtype(self.dtype).itemsize

    @property
    def name(self) -> str:
        return self.quantize or self.dtype

    def nbytes(self, spec: ParamSpec, *, shape: tuple[int, ...] | None = None, matrix: bool = True) -> int:
        """Bytes of `spec` stored in this format (of one shard of it when `shape` gives the shard's shape).

        Only a matrix (`matrix=True`) is quantized; its scales count per group of 32 inputs, or per output
        channel (int8), the inputs being its axes that are neither stacked nor outputs (`output_axes`).
        """
        shape = spec.shape if shape is None else shape
        elements = math.prod(shape)
        if self.quantize is None or not matrix:
            return elements * self.itemsize
        fmt = FORMATS[self.quantize]
        inputs = math.prod(n for n, axis in zip(shape, spec.axes)
                           if axis not in STACK_AXES and axis not in output_axes(spec))
        # Integers, counted exactly (the same sum as `quant.Format.bytes_per_weight`, which is per weight).
        groups = math.ceil(elements / (fmt.group or inputs))
        return math.ceil(elements * fmt.bits / 8) + groups * 2 * (1 + fmt.affine)


def output_axes(spec: ParamSpec) -> tuple[str | None, ...]:
    """The axes a matrix writes: its last one, with the head axis before it for a per-head projection."""
    return tuple(spec.axes[-2:]) if spec.axes[-1] == "head_dim" else (spec.axes[-1],)


def storage(dtype: str | np.dtype = DEFAULT_DTYPE, quantize: str | None = None, *,
            dtype_name: str = "dtype", quantize_name: str = "quantize") -> Storage:
    """The `Storage` of a float `dtype` and an optional `quantize` format; a quantized name given as `dtype`
    (e.g. "int4") means that format with float16 for the rest. Bad names raise, naming the argument."""
    if not isinstance(dtype, (str, np.dtype)):
        raise TypeError(f"{dtype_name} must be a dtype name such as 'float16' or 'int4', got {quote(dtype)} "
                        f"({type(dtype).__name__})")
    if quantize is not None and quantize not in QUANTIZED:
        raise ValueError(f"{quantize_name} must be one of {', '.join(QUANTIZED)} (or None), got {quote(quantize)}")
    if isinstance(dtype, str) and dtype in QUANTIZED:
        if quantize is not None and quantize != dtype:
            raise ValueError(f"{dtype_name}={dtype!r} and {quantize_name}={quantize!r} disagree: give one format")
        return Storage(DEFAULT_DTYPE, dtype)
    name = FLOAT_ALIASES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    try:
        resolved = np.dtype(name)
    except TypeError:
        resolved = None
    if resolved is None or resolved.kind not in "fiuV" or resolved.itemsize == 0:
        raise ValueError(f"{dtype_name} {dtype!r} is not a numeric dtype name: expected a float such as 'float16', "
                         f"'bfloat16', 'float8', an integer such as 'int8', or a quantized format "
                         f"({', '.join(QUANTIZED)})")
    return Storage(str(resolved), quantize)
