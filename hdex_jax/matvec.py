"""The matrix products of the forward pass: on the CPU, products of up to `MAX_ROWS` rows (decode steps and short
prompts) run on the kernel of `csrc/matvec.cc`, the others on XLA's dot.

Decode reads every weight once per token, so its speed is the rate at which the products read their weights.
XLA CPU's products of SmolLM2's layer shapes read them at 15-21 GB/s where a plain stream reaches about 30; the
kernel streams each weight once, one contiguous piece per core, and reaches about 29; with several rows it keeps
blocks of the weight in L2 while register tiles of every row pass over them (docs/performance.md, "The
matrix-vector kernel"). It is an XLA FFI custom call, so it runs inside the jitted and exported programs like any
other operation. It reads the weight in the format it is stored in (float32, float16, bfloat16, or a
`hdex_jax.quant.QuantArray`: q8_0, q4_0, q4_1, int8, int4), converting each register of it to float32, so fewer
bytes per weight are fewer bytes read per token; activations enter it as float32 and it sums in float32. Where
XLA multiplies, a QuantArray is dequantized inside the program for that product, never kept as a float copy.

The kernel is built and registered by `hdex_jax.runtime.setup` (`hdex_jax.kernel_build`), which every entry
point calls; a product traced where it is not registered (no compiler, `HDEX_MATVEC=0`, no setup) is XLA's dot:
the same results to float32 rounding, only slower.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from hdex_jax import kernel_build, quant
from hdex_jax.quant import QuantArray

# Products with more rows (longer prompts) go to XLA's dot, which is as fast at 64 rows and faster beyond
# (docs/performance.md). Attention's products (one dot product per key for the scores) stop at fewer rows.
MAX_ROWS = 32
MAX_ATTENTION_ROWS = 8
# Weights XLA would have to convert before its dot (float16, and the quantized formats, which it dequantizes) stay
# on the kernel up to more rows: XLA CPU converts each whole weight to float32 inside the program, every prompt pass
# (2/3 of SmolLM2's 64-token prompt pass in float16, and most of it with the default model's Q4_1 blocks). The kernel
# reads them as stored and measured faster than that conversion and dot at 64 rows on every shape, and at 128 rows
# on the layers' [K, N] weights but not on the [N, K] LM head (docs/performance.md, "Weights XLA converts").
MAX_CONVERTED_ROWS = 128
MAX_CONVERTED_NK_ROWS = 64
# Weights the kernel reads as stored, besides QuantArray's formats.
KERNEL_FLOATS = tuple(jnp.dtype(t) for t in (jnp.float32, jnp.float16, jnp.bfloat16))


def _kernel_product(x: jax.Array, values: jax.Array, scale: jax.Array, offset: jax.Array, transposed: bool,
                    format: str) -> jax.Array:
    # x: [B, M, K] float32; values: [B, K, N], or [B, N, K] when transposed (4-bit formats: K / 2 bytes), with
    # scale and offset [1, K / group, N] or [1, N, K / group] float16 (empty when the format has none)
    # -> [B, M, N] float32
    n = values.shape[1] if transposed else values.shape[2]
    out = jax.ShapeDtypeStruct((*x.shape[:2], n), jnp.float32)
    return jax.ffi.ffi_call(kernel_build.TARGET, out)(x, values, scale, offset, transposed=transposed, format=format)


def _dot(x: jax.Array, w: jax.Array | QuantArray, transposed: bool, preferred_element_type=None) -> jax.Array:
    """x [*batch, M, K] @ w [*batch, K, N] (or [*batch, N, K] when transposed) -> [*batch, M, N] on XLA's dot,
    summed in float32; w without batch axes is one matrix for every row of x [..., K]. A quantized w is
    dequantized here, inside the program, for this product only."""
    if isinstance(w, QuantArray):
        w = quant.dequantize(w, x.dtype)
    dtype = jnp.promote_types(x.dtype, w.dtype)
    batch = tuple(range(w.ndim - 2))
    contract = w.ndim - 1 if transposed else w.ndim - 2
    y = lax.dot_general(x.astype(dtype), w.astype(dtype), (((x.ndim - 1,), (contract,)), (batch, batch)),
                        preferred_element_type=jnp.float32)
    return y.astype(preferred_element_type or x.dtype)


def _on_kernel(x: jax.Array, w: jax.Array | QuantArray, rows: int, max_rows: int) -> bool:
    stored = isinstance(w, QuantArray) or w.dtype in KERNEL_FLOATS
    return rows <= max_rows and x.dtype in KERNEL_FLOATS and stored and kernel_build.registered() is not None


def _max_rows(w: jax.Array | QuantArray, transposed: bool) -> int:
    """The most rows of a `matmul` by w that run on the kernel."""
    if not (isinstance(w, QuantArray) or w.dtype == jnp.float16):
        return MAX_ROWS
    return MAX_CONVERTED_NK_ROWS if transposed else MAX_CONVERTED_ROWS


def _product(x: jax.Array, w: jax.Array | QuantArray, transposed: bool, preferred_element_type) -> jax.Array:
    # x: [B, M, K]; w: [B, K, N] or [B, N, K] -> [B, M, N], on the kernel on the CPU and XLA's dot elsewhere.
    # The kernel takes x and gives y in float32 (x is a few rows: its cast costs nothing next to the weight).
    out_dtype = preferred_element_type or x.dtype
    if isinstance(w, QuantArray):
        fields = (w.values[None], w.scale[None],
                  jnp.zeros((0,), jnp.float16) if w.offset is None else w.offset[None])
        fmt = w.format
    else:
        fields = (w, jnp.zeros((0,), jnp.float16), jnp.zeros((0,), jnp.float16))
        fmt = "float"

    def on_cpu(x, values, scale, offset):
        y = _kernel_product(x.astype(jnp.float32), values, scale, offset, transposed, fmt)
        return y.astype(out_dtype)

    def elsewhere(x, values, scale, offset):
        if isinstance(w, QuantArray):
            stored = QuantArray(values[0], scale[0], None if w.offset is None else offset[0], w.format, w.axis)
            return _dot(x[0], stored, transposed, out_dtype)[None]
        return _dot(x, values, transposed, out_dtype)

    return lax.platform_dependent(x, *fields, cpu=on_cpu, default=elsewhere)


def _check_quantized(x: jax.Array, w: QuantArray, transposed: bool) -> None:
    expected = 1 if transposed else 0
    if w.values.ndim != 2 or w.axis != expected:
        raise ValueError(f"matmul: a quantized w must be 2-D and packed along its inputs (axis {expected} for "
                         f"transposed={transposed}), got values of shape {w.values.shape} packed along {w.axis}")
    if w.shape[expected] != x.shape[-1]:
        raise ValueError(f"matmul: x [..., {x.shape[-1]}] does not match the inputs of w {w.shape} "
                         f"(transposed={transposed})")


def matmul(x: jax.Array, w: jax.Array | QuantArray, transposed: bool = False, preferred_element_type=None
           ) -> jax.Array:
    """x [..., K] @ w [K, N] -> [..., N]; with `transposed`, w is [N, K] and is contracted on K as it is stored
    (a transpose inside the program would copy it every step). Sums are float32; the result is
    `preferred_element_type` as in `lax.dot_general`, else x's dtype.

    w is float32, float16 or bfloat16, or a `hdex_jax.quant.QuantArray` (packed along K: axis 0, or 1 when
    transposed). On the CPU, products of at most `MAX_ROWS` rows (for a float16 or quantized w, which XLA would
    convert first, `MAX_CONVERTED_ROWS`, or `MAX_CONVERTED_NK_ROWS` when transposed) run on the kernel, which reads
    w as stored; the others on XLA's dot, which dequantizes a QuantArray inside the program for the product.
    """
    if isinstance(w, QuantArray):
        _check_quantized(x, w, transposed)
    *lead, K = x.shape
    rows = math.prod(lead)
    if not _on_kernel(x, w, rows, _max_rows(w, transposed)):
        return _dot(x, w, transposed, preferred_element_type)
    w = w if isinstance(w, QuantArray) else w[None]
    y = _product(x.reshape(1, rows, K), w, transposed, preferred_element_type)  # [1, rows, N]
    return y.reshape(*lead, y.shape[-1])


def batched_matmul(x: jax.Array, w: jax.Array, transposed: bool = False, preferred_element_type=None) -> jax.Array:
    """One product per leading index: x [*batch, M, K] @ w [*batch, K, N] -> [*batch, M, N] (w [*batch, N, K]
    when `transposed`): attention's products, w float32, float16 or bfloat16 (a KV cache in that dtype), on the
    kernel under the conditions of `matmul` but with at most `MAX_ATTENTION_ROWS` rows M."""
    if isinstance(w, QuantArray):
        raise TypeError("batched_matmul: w must be a float32, float16 or bfloat16 array (a KV cache), not a "
                        f"{w.format} QuantArray; quantized weights go through matmul")
    *batch, M, K = x.shape
    if not _on_kernel(x, w, M, MAX_ATTENTION_ROWS):
        return _dot(x, w, transposed, preferred_element_type)
    y = _product(x.reshape(-1, M, K), w.reshape(-1, *w.shape[-2:]), transposed, preferred_element_type)
    return y.reshape(*batch, M, y.shape[-1])  # [*batch, M, N]
