"""Weights stored in fewer bits: `QuantArray`, one pytree leaf holding a quantized weight's integers and scales.

A quantized weight keeps integers along its input (contracted) features in groups, each group with a float16
scale and, for the affine formats, a float16 offset: weight = scale * (integer - zero) + offset. The formats:

| format | bits | group | zero | offset | what it is |
|---|---|---|---|---|---|
| q8_0 | 8 | 32 | 0 | no | GGUF Q8_0 as stored (34 bytes per 32 weights) |
| q4_0 | 4 | 32 | 8 | no | GGUF Q4_0 as stored (18 bytes per 32) |
| q4_1 | 4 | 32 | 0 | yes | GGUF Q4_1 as stored (20 bytes per 32) |
| int8 | 8 | all inputs | 0 | no | symmetric per-output-channel int8, computed by hdex_jax |
| int4 | 4 | 32 | 0 | yes | group-wise affine int4 (llama.cpp's Q4_1 quantizer), computed by hdex_jax |

Layout, shared by the kernel (csrc/matvec.cc), the XLA path (`dequantize`) and the files in `param/`:
- `values` has the weight's shape, except along `axis` (the innermost input axis): int8 holds one value per
  weight; 4-bit formats hold two per uint8 byte, half as many along `axis`. Within each group of 32 along
  `axis`, byte j holds value j in its low nibble and value j + 16 in its high nibble: GGUF's own order, so its
  blocks are kept byte for byte.
- `scale` (and `offset`) have the weight's shape with `axis` divided by the group, and size 1 on the other
  input axes when a group spans them (int8's one scale per output channel).
The arithmetic is float32, as transformers dequantizes GGUF blocks (gguf's numpy code): q4_1 is d * q + m,
q4_0 is d * (q - 8), q8_0 is d * q, each product and sum rounded to float32.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

GROUP = 32


@dataclasses.dataclass(frozen=True)
class Format:
    """How one quantized format stores a weight."""

    name: str
    bits: int
    group: int | None  # values per scale along the packed axis; None is one scale per output channel
    zero: int  # subtracted from each stored integer before scaling
    affine: bool  # has an offset per group

    def bytes_per_weight(self, inputs: int) -> float:
        """Storage of one weight, scales included, for a weight with `inputs` input features."""
        group = self.group or inputs
        return self.bits / 8 + (2 + 2 * self.affine) / group


FORMATS = {f.name: f for f in (
    Format("q8_0", 8, GROUP, 0, False),
    Format("q4_0", 4, GROUP, 8, False),
    Format("q4_1", 4, GROUP, 0, True),
    Format("int8", 8, None, 0, False),
    Format("int4", 4, GROUP, 0, True),
)}
# Formats a GGUF file's tensors are kept in, by their GGML type name.
GGUF_KEPT = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantArray:
    """A quantized weight: integers, scales and (affine formats) offsets, with its format and packed axis.

    Array operations that keep the packed axis and every group whole (reshaping or indexing other axes,
    concatenating along outputs) apply to each field alike: `jax.tree.map(f, w)`.
    """

    values: Any
    scale: Any
    offset: Any
    format: str = dataclasses.field(metadata={"static": True})
    axis: int = dataclasses.field(metadata={"static": True})

    @property
    def spec(self) -> Format:
        return FORMATS[self.format]

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the weight it stands for."""
        shape = list(self.values.shape)
        shape[self.axis] *= 8 // self.spec.bits
        return tuple(shape)

    @property
    def nbytes(self) -> int:
        fields = [self.values, self.scale] + ([self.offset] if self.offset is not None else [])
        return sum(int(np.prod(f.shape)) * np.dtype(f.dtype).itemsize for f in fields)


# Exported programs (inst/) take QuantArrays; their format and packed axis travel as the node's metadata.
export.register_pytree_node_serialization(
    QuantArray, serialized_name="hdex_jax.QuantArray",
    serialize_auxdata=lambda aux: json.dumps(list(aux)).encode(),
    deserialize_auxdata=lambda data: tuple(json.loads(data)))


def is_quant(x: Any) -> bool:
    return isinstance(x, QuantArray)


def map_fields(fn: Any, *weights: Any, axis: int | None = None) -> Any:
    """`fn` applied to plain arrays, or to each field of QuantArrays of one format alike (the result packed along
    `axis`, by default theirs): the array operations that keep every group whole."""
    first = weights[0]
    if not is_quant(first):
        return fn(*weights)
    offset = None if first.offset is None else fn(*(w.offset for w in weights))
    return QuantArray(fn(*(w.values for w in weights)), fn(*(w.scale for w in weights)), offset, first.format,
                      first.axis if axis is None else axis)


def field_shapes(shape: tuple[int, ...], axis: int, inputs: tuple[int, ...], fmt: str
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of `values` and of `scale` (= `offset`) of a weight of `shape` whose input axes are `inputs`
    (`axis`, the packed one, among them)."""
    spec = FORMATS[fmt]
    values = list(shape)
    values[axis] //= 8 // spec.bits
    scale = list(shape)
    if spec.group is None:
        for a in inputs:
            scale[a] = 1
    else:
        scale[axis] //= spec.group
    return tuple(values), tuple(scale)


def _unpack(values: Any, w: QuantArray, xp: Any) -> Any:
    """The stored integers as float32, in the weight's shape (4-bit nibbles unpacked in GGUF's order)."""
    spec, axis = w.spec, w.axis
    if spec.bits == 8:
        return values.astype(xp.float32)
    shape = values.shape
    blocks = values.reshape(*shape[:axis], shape[axis] // (GROUP // 2), 1, GROUP // 2, *shape[axis + 1:])
    low, high = blocks & 0xF, blocks >> 4
    ints = xp.concatenate([low, high], axis=axis + 1).astype(xp.int32) - spec.zero
    return ints.reshape(*shape[:axis], shape[axis] * 2, *shape[axis + 1:]).astype(xp.float32)


def _dequantize(w: QuantArray, xp: Any) -> Any:
    values = _unpack(w.values, w, xp)  # [..., K, ...] float32
    axis, shape = w.axis, values.shape
    group = shape[axis] // w.scale.shape[axis] if w.scale.shape[axis] > 1 else shape[axis]
    grouped = values.reshape(*shape[:axis], shape[axis] // group, group, *shape[axis + 1:])
    # scales [..., K / group, ...] -> [..., K / group, 1, ...], against the grouped values
    out = grouped * xp.expand_dims(w.scale.astype(xp.float32), axis + 1)
    if w.offset is not None:
        out = out + xp.expand_dims(w.offset.astype(xp.float32), axis + 1)
    return out.reshape(shape)


def dequantize(w: QuantArray, dtype: Any = jnp.float32) -> jax.Array:
    """The weight's values in `dtype`, computed inside the program (the XLA path of a product)."""
    return _dequantize(w, jnp).astype(dtype)


def dequantize_np(w: QuantArray) -> np.ndarray:
    """The weight's values as float32 numpy (converters, tests, re-quantization)."""
    w = jax.tree.map(np.asarray, w)
    return _dequantize(w, np).astype(np.float32)


def take_rows(w: QuantArray, rows: jax.Array) -> QuantArray:
    """Rows `rows` of a weight packed along its last axis (an embedding [V, E] -> [..., E])."""
    assert w.axis == w.values.ndim - 1, "rows of a weight packed along its rows would split its groups"
    offset = None if w.offset is None else w.offset[rows]
    return QuantArray(w.values[rows], w.scale[rows], offset, w.format, rows.ndim + w.axis - 1)


def _pack4(ints: np.ndarray, axis: int) -> np.ndarray:
    """4-bit integers [..., K, ...] (0..15) -> bytes [..., K/2, ...] in GGUF's order within groups of 32."""
    ints = np.moveaxis(ints.astype(np.uint8), axis, -1)
    blocks = ints.reshape(*ints.shape[:-1], -1, 2, GROUP // 2)
    packed = (blocks[..., 0, :] | (blocks[..., 1, :] << 4)).reshape(*ints.shape[:-1], -1)
    return np.moveaxis(packed, -1, axis)


def quantize(x: np.ndarray, fmt: str, axis: int, inputs: tuple[int, ...]) -> QuantArray:
    """Quantize a float weight (numpy) whose input axes are `inputs`, packed along `axis` (int8, int4, or any
    GGUF-kept format, with llama.cpp's quantizers for the latter)."""
    x = np.asarray(x, np.float32)
    if fmt == "int8":
        amax = np.max(np.abs(x), axis=inputs, keepdims=True)
        scale = (amax / 127).astype(np.float16)
        inv = np.where(scale == 0, 0, 1 / np.maximum(scale.astype(np.float32), np.finfo(np.float32).tiny))
        values = np.clip(np.rint(x * inv), -127, 127).astype(np.int8)
        return QuantArray(values, scale, None, fmt, axis)
    if x.shape[axis] % GROUP:
        raise ValueError(f"{fmt} needs a multiple of {GROUP} input features along axis {axis}, got shape {x.shape}")
    import gguf  # the converters' dependency; quantizing runs at compile time only

    ggml = {"int4": "Q4_1", "q4_1": "Q4_1", "q4_0": "Q4_0", "q8_0": "Q8_0"}[fmt]
    rows = np.moveaxis(x, axis, -1)
    blocks = gguf.quants.quantize(np.ascontiguousarray(rows), gguf.GGMLQuantizationType[ggml])
    return from_gguf_blocks(blocks, ggml, fmt, rows.shape, axis)


def from_gguf_blocks(raw: np.ndarray, ggml_type: str, fmt: str, shape: tuple[int, ...], axis: int
                     ) -> QuantArray:
    """GGUF blocks of a tensor of `shape` (blocks along its last axis, as GGUF stores them) -> a QuantArray whose
    packed axis is then moved to `axis`."""
    bytes_per_block = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[ggml_type]
    blocks = np.asarray(raw, np.uint8).reshape(*shape[:-1], shape[-1] // GROUP, bytes_per_block)
    scale = blocks[..., 0:2].copy().view(np.float16)[..., 0]  # [..., K / 32]
    start = 2
    offset = None
    if ggml_type == "Q4_1":
        offset = blocks[..., 2:4].copy().view(np.float16)[..., 0]
        start = 4
    data = blocks[..., start:]
    values = data.copy().view(np.int8) if ggml_type == "Q8_0" else data.copy()
    values = values.reshape(*shape[:-1], -1)  # [..., K] int8 or [..., K / 2] bytes

    def place(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else np.ascontiguousarray(np.moveaxis(a, -1, axis))

    return QuantArray(place(values), place(scale), place(offset), fmt, axis)


def expand(w: QuantArray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A quantized weight as three arrays of its own shape: its integers (int8, zero not yet subtracted) and
    each element's scale and offset. Layout transforms (transposes, reshapes into heads, row permutations) apply
    to each alike; `regroup` packs the result again."""
    w = jax.tree.map(np.asarray, w)
    if w.spec.bits == 8:
        ints = w.values
    else:
        shape = w.values.shape
        blocks = w.values.reshape(*shape[:w.axis], shape[w.axis] // (GROUP // 2), 1, GROUP // 2,
                                  *shape[w.axis + 1:])
        ints = np.concatenate([blocks & 0xF, blocks >> 4], axis=w.axis + 1).reshape(w.shape).astype(np.int8)
    group = w.shape[w.axis] // w.scale.shape[w.axis]

    def per_element(x: np.ndarray | None) -> np.ndarray | None:
        return None if x is None else np.broadcast_to(np.repeat(x, group, axis=w.axis), w.shape)

    return ints, per_element(w.scale), per_element(w.offset)


def regroup(ints: np.ndarray, scale: np.ndarray, offset: np.ndarray | None, fmt: str, axis: int
            ) -> QuantArray | None:
    """`expand`'s arrays after a layout transform -> a QuantArray packed along `axis`, or None when the
    transform split a group (its scales are then not constant over each group of that axis)."""
    group = FORMATS[fmt].group
    if group is None or ints.shape[axis] % group:
        return None
    starts = [slice(None)] * ints.ndim
    starts[axis] = slice(0, None, group)

    def grouped(x: np.ndarray | None) -> np.ndarray | None:
        if x is None:
            return None
        first = np.ascontiguousarray(x[tuple(starts)])
        return first if np.array_equal(np.repeat(first, group, axis=axis), x) else False

    scale_g, offset_g = grouped(scale), grouped(offset)
    if scale_g is False or offset_g is False:
        return None
    values = _pack4(ints, axis) if FORMATS[fmt].bits == 4 else np.ascontiguousarray(ints.astype(np.int8))
    return QuantArray(values, scale_g, offset_g, fmt, axis)
