"""Head padding and KV-head replication so that any model splits evenly over N devices.

For N devices every device must hold the same number of query heads and of KV heads, and its query heads
must belong to its own KV heads. With G = num_heads // num_kv_heads query heads per KV head:

- N <= KV: KV heads are padded with zero heads to a multiple of N (r = 1 replica each);
- N >  KV: KV heads are padded to the smallest divisor of N not below KV, and each is replicated
  r = N / KV_padded times, one replica per device.

The query group of each KV head is padded to a multiple of r with zero heads and split between its
replicas. Zero query heads attend to something, but their rows of `o` are zero, so they add nothing:
padding never changes results. The padded model is an ordinary GQA model with more heads.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from hdex_jax import quant
from hdex_jax.config import ModelConfig
from hdex_jax.params import ParamSpec, flatten, param_specs
from hdex_jax.validation import check_int


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """How the heads of a model are arranged for `num_device` devices."""

    num_device: int
    kv_heads: int  # the model's own KV heads
    group: int  # the model's query heads per KV head
    kv_padded: int  # KV heads after zero padding
    replicas: int  # copies of each padded KV head
    group_padded: int  # query heads per padded KV head, after zero padding

    @property
    def stored_kv_heads(self) -> int:
        return self.kv_padded * self.replicas

    @property
    def stored_heads(self) -> int:
        return self.kv_padded * self.group_padded


def head_layout(cfg: ModelConfig, num_device: int) -> HeadLayout:
    """The head arrangement of `cfg` over `num_device` devices."""
    num_device = check_int("num_device", num_device, minimum=1)
    kv, group = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
    if num_device <= kv:
        kv_padded, replicas = math.ceil(kv / num_device) * num_device, 1
    else:
        kv_padded = min(d for d in range(kv, num_device + 1) if num_device % d == 0)
        replicas = num_device // kv_padded
    group_padded = math.ceil(group / replicas) * replicas
    return HeadLayout(num_device, kv, group, kv_padded, replicas, group_padded)


def padded_config(cfg: ModelConfig, num_device: int) -> ModelConfig:
    """`cfg` with the heads, FFN features and vocabulary rows that `num_device` devices store.

    FFN features are padded like heads: zero columns of up/gate (and their biases) and zero rows of down, so
    a padded feature contributes nothing whatever the activation.
    """
    layout = head_layout(cfg, num_device)
    # A norm over all heads (OLMo 2's q/k norm) averages over the model's own features: zero heads add nothing to
    # its sum of squares, and each of r replicas of a KV head adds its part once more.
    features = ((cfg.qk_norm_size(kv=False), cfg.qk_norm_size(kv=True) * layout.replicas)
                if cfg.qk_norm == "all" else ())
    return dataclasses.replace(cfg, num_heads=layout.stored_heads, num_kv_heads=layout.stored_kv_heads,
                               intermediate_size=_round_up(cfg.intermediate_size, num_device * _ffn_group(cfg)),
                               vocab_padding=-cfg.vocab_size % num_device, qk_norm_features=features)


def _ffn_group(cfg: ModelConfig) -> int:
    """Features of a quantized group along the FFN axis: each device's share of a weight whose input is the
    FFN (down) must hold whole groups."""
    groups = [quant.FORMATS[spec.format].group or 1 for spec in flatten(param_specs(cfg)).values()
              if spec.format is not None and spec.axes[spec.packed_axis] == "ffn"]
    return max(groups, default=1)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_axis(x: np.ndarray, axis: int, size: int) -> np.ndarray:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return np.pad(x, pad)


def _pad_q_heads(x: np.ndarray, axis: int, layout: HeadLayout) -> np.ndarray:
    """[..., H, ...] -> [..., KV_padded * G_padded, ...] with zero heads."""
    shape = x.shape
    grouped = x.reshape(*shape[:axis], layout.kv_heads, layout.group, *shape[axis + 1:])
    grouped = _pad_axis(grouped, axis + 1, layout.group_padded)
    grouped = _pad_axis(grouped, axis, layout.kv_padded)
    return grouped.reshape(*shape[:axis], layout.stored_heads, *shape[axis + 1:])


def _pad_kv_heads(x: np.ndarray, axis: int, layout: HeadLayout) -> np.ndarray:
    """[..., KV, ...] -> [..., KV_padded * replicas, ...]: zero heads, then each head repeated."""
    return np.repeat(_pad_axis(x, axis, layout.kv_padded), layout.replicas, axis=axis)


def pad_params(flat: dict[str, np.ndarray], cfg: ModelConfig, num_device: int) -> dict[str, np.ndarray]:
    """Canonical flat params of `cfg` -> those of `padded_config(cfg, num_device)` (numpy, unsharded).

    Driven by the declarations: every axis declared "heads", "kv_heads", "ffn" or "vocab" is padded (or its
    KV heads replicated) to the padded config's size, whatever the weight is called.
    """
    layout = head_layout(cfg, num_device)
    padded = padded_config(cfg, num_device)
    pads = {
        "heads": lambda x, axis: _pad_q_heads(x, axis, layout),
        "kv_heads": lambda x, axis: _pad_kv_heads(x, axis, layout),
    }
    sizes = {"ffn": (cfg.intermediate_size, padded.intermediate_size),
             "vocab": (cfg.stored_vocab_size, padded.stored_vocab_size)}

    def pad(x: np.ndarray, spec: ParamSpec) -> np.ndarray:
        for axis, logical in enumerate(spec.axes):
            if logical in ("heads", "kv_heads"):
                x = pads[logical](np.asarray(x), axis)
            elif logical in sizes:
                # A packed field holds a fixed share of the features per element (half of them, or a group's).
                size, padded_size = sizes[logical]
                x = _pad_axis(np.asarray(x), axis, x.shape[axis] * padded_size // size)
        return x

    specs = flatten(param_specs(cfg))
    out = {}
    for name, value in flat.items():
        spec = specs[name]
        if spec.format is None:
            out[name] = pad(value, spec)
        else:
            fields = spec.field_specs()
            out[name] = quant.QuantArray(pad(value.values, fields.values), pad(value.scale, fields.scale),
                                         None if value.offset is None else pad(value.offset, fields.offset),
                                         value.format, value.axis)
    return out


def kv_head_sources(layout: HeadLayout) -> np.ndarray:
    """For each stored KV head, the model's KV head it holds, or -1 for a zero (padding) head."""
    padded = np.arange(layout.stored_kv_heads) // layout.replicas
    return np.where(padded < layout.kv_heads, padded, -1)


def kv_head_map(src: HeadLayout, dst: HeadLayout) -> np.ndarray:
    """For each stored KV head of `dst`, the index of a stored head of `src` holding the same data, or -1."""
    src_sources = kv_head_sources(src)
    first = {int(h): i for i, h in reversed(list(enumerate(src_sources))) if h >= 0}
    return np.asarray([first[int(h)] if h >= 0 else -1 for h in kv_head_sources(dst)])
