"""RoPE frequencies and their scalings: every kind transformers defines, in one place.

`ModelConfig.rope_scaling` holds a checkpoint's rope parameters beyond theta (`rope_type` and its keys, as in
transformers' `rope_parameters`). From them this module computes what transformers' `ROPE_INIT_FUNCTIONS` and
its `dynamic_rope_update` compute (transformers/modeling_rope_utils.py):

- `linear`: every inverse frequency divided by `factor`.
- `llama3`: long wavelengths divided by `factor`, short ones kept, the band between smoothed.
- `yarn`: interpolated and extrapolated frequencies blended by a linear ramp over the dimensions between
  `beta_fast` and `beta_slow` rotations of the original length; cos and sin scaled by the attention factor
  (`attention_factor`, else from `factor`, `mscale` and `mscale_all_dim`).
- `longrope`: `short_factor` while the sequence is within `original_max_position_embeddings`, `long_factor`
  beyond it; cos and sin scaled by the attention factor.
- `dynamic` (NTK): theta grows with the sequence length once it exceeds `max_position_embeddings`.
- `freq_factors`: inverse frequencies divided by per-frequency `factors` (llama.cpp's `rope_freqs` tensor,
  the form GGUF files give llama3 scaling).

The two kinds that depend on the sequence length (dynamic, longrope) take it at run time, from the positions of
the forward pass (`tables`): the largest position + 1 over the batch, as transformers' `max(position_ids) + 1`.
A decode step therefore uses the length it has reached, without any recompilation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from hdex_jax.config import ModelConfig


def check_scaling(scaling: Mapping[str, Any], rope_dim: int | None = None) -> None:
    """Raise ValueError naming the kind or key when `scaling` (ModelConfig.rope_scaling as a dict) is unusable;
    given `rope_dim`, also when a list of per-frequency factors does not have one entry per frequency."""
    kind = scaling.get("rope_type", "default")
    if kind == "default":
        return
    if kind not in _KINDS:
        raise ValueError(f"rope scaling type {kind!r} is not supported (supported: default, "
                         f"{', '.join(SCALING_KINDS)})")
    missing = [key for key in _KINDS[kind].required if scaling.get(key) is None]
    if missing:
        raise ValueError(f"rope scaling {kind!r} needs {', '.join(missing)}")
    for key in ("short_factor", "long_factor", "factors"):
        if rope_dim is not None and key in _KINDS[kind].required and len(scaling[key]) != rope_dim // 2:
            raise ValueError(f"rope scaling {kind!r}: {key} has {len(scaling[key])} entries, the rotary dimension "
                             f"{rope_dim} needs {rope_dim // 2}")


def _base_inv_freq(theta: float, dim: int) -> np.ndarray:
    """Unscaled inverse frequencies `[dim // 2]`, float64."""
    return 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))


def _original_length(cfg: ModelConfig) -> int:
    return int(dict(cfg.rope_scaling)["original_max_position_embeddings"])


def _factor(cfg: ModelConfig) -> float:
    """yarn's and longrope's `factor`; when the checkpoint leaves it out, the ratio of the extended length to the
    original one, as transformers takes it."""
    factor = dict(cfg.rope_scaling).get("factor")
    return float(factor) if factor is not None else cfg.max_position_embeddings / _original_length(cfg)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(cfg: ModelConfig, inv_freq: np.ndarray) -> np.ndarray:
    scaling = dict(cfg.rope_scaling)
    dim, theta, factor = cfg.rope_dim, cfg.rope_theta, _factor(cfg)
    original = _original_length(cfg)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        """The dimension whose wavelength makes `rotations` turns over the original length."""
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers, against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolated = 1 - ramp  # share of the unscaled frequency, per dimension pair
    return inv_freq / factor * (1 - extrapolated) + inv_freq * extrapolated


def _llama3(cfg: ModelConfig, inv_freq: np.ndarray) -> np.ndarray:
    scaling = dict(cfg.rope_scaling)
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_medium, smoothed, scaled)


def _longrope(cfg: ModelConfig, inv_freq: np.ndarray, key: str) -> np.ndarray:
    return inv_freq / np.asarray(dict(cfg.rope_scaling)[key], np.float64)


@dataclasses.dataclass(frozen=True)
class _Kind:
    """One scaling kind: the keys it needs and its inverse frequencies from the unscaled ones (for a kind that
    depends on the sequence length, those of a sequence within the original length)."""

    required: tuple[str, ...]
    inv_freq: Callable[[ModelConfig, np.ndarray], np.ndarray]
    length_dependent: bool = False


# Scaling kinds beyond the default rope.
_KINDS: dict[str, _Kind] = {
    "linear": _Kind(("factor",), lambda cfg, inv: inv / float(dict(cfg.rope_scaling)["factor"])),
    # Unscaled within the original length; `_runtime_inv_freq` grows theta beyond it.
    "dynamic": _Kind(("factor",), lambda cfg, inv: inv, length_dependent=True),
    "yarn": _Kind(("original_max_position_embeddings",), _yarn),
    # The short factors within the original length; `_runtime_inv_freq` switches to the long ones beyond it.
    "longrope": _Kind(("short_factor", "long_factor", "original_max_position_embeddings"),
                      lambda cfg, inv: _longrope(cfg, inv, "short_factor"), length_dependent=True),
    "llama3": _Kind(("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), _llama3),
    "freq_factors": _Kind(("factors",), lambda cfg, inv: inv / np.asarray(dict(cfg.rope_scaling)["factors"],
                                                                           np.float64)),
}
SCALING_KINDS: tuple[str, ...] = tuple(_KINDS)


def _kind(cfg: ModelConfig) -> str:
    return dict(cfg.rope_scaling).get("rope_type", "default")


def inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies `[rope_dim // 2]` float64 with the configured scaling applied; for the kinds that depend
    on the sequence length, those of a sequence within the original length (dynamic: unscaled; longrope: the short
    factors)."""
    base = _base_inv_freq(cfg.rope_theta, cfg.rope_dim)
    kind = _kind(cfg)
    return base if kind == "default" else _KINDS[kind].inv_freq(cfg, base)


def attention_factor(cfg: ModelConfig) -> float:
    """The factor transformers multiplies cos and sin by (`attention_scaling`): 1 but for yarn and longrope."""
    scaling = dict(cfg.rope_scaling)
    kind = _kind(cfg)
    if kind not in ("yarn", "longrope"):
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = _factor(cfg)
    if kind == "yarn":
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            return _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        return _yarn_mscale(factor)
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(_original_length(cfg)))


def _runtime_inv_freq(positions: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies `[rope_dim // 2]` float32 for a forward pass over `positions` [B, T]."""
    scaling = dict(cfg.rope_scaling)
    kind = _kind(cfg)
    inv = jnp.asarray(inv_freq(cfg), jnp.float32)  # [rd/2]
    if kind == "default" or not _KINDS[kind].length_dependent:
        return inv
    seq_len = jnp.max(positions) + 1  # over the whole batch, as transformers' max(position_ids) + 1
    if kind == "longrope":
        long = jnp.asarray(_longrope(cfg, _base_inv_freq(cfg.rope_theta, cfg.rope_dim), "long_factor"), jnp.float32)
        return jnp.where(seq_len > _original_length(cfg), long, inv)
    # Dynamic NTK: theta * s ** (d / (d - 2)) with s = factor * L / max_positions - (factor - 1), L at least
    # max_positions. Written as the unscaled frequencies times s ** (-2i / (d - 2)), so that within the original
    # length (s = 1) they are exactly the unscaled ones.
    factor, max_positions = float(scaling["factor"]), cfg.max_position_embeddings
    length = jnp.maximum(seq_len, max_positions).astype(jnp.float32)
    s = factor * length / max_positions - (factor - 1)
    exponent = jnp.asarray(np.arange(0, cfg.rope_dim, 2) / (cfg.rope_dim - 2), jnp.float32)  # [rd/2]
    return inv * s ** -exponent


def tables(positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos and sin `[B, T, 1, rope_dim]` of the positions `[B, T]`, scaled by the attention factor."""
    inv = _runtime_inv_freq(positions, cfg)  # [rd/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv  # [B, T, rd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, rd]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    scale = attention_factor(cfg)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos, sin
