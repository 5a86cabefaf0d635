"""Emulated LPU devices as a JAX mesh, and the one table that maps logical axes to mesh axes.

Every `PartitionSpec` in hdex_jax is derived from `LOGICAL_RULES` and the logical axes each weight declares
(`hdex_jax.params.param_specs`); none is written by hand elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hdex_jax.config import ModelConfig
from hdex_jax.params import ParamSpec, is_spec, param_specs

LPU_AXIS = "lpu"

# Megatron layout: heads, kv heads, ffn and vocab are split over the LPU devices; everything else is replicated.
LOGICAL_RULES: dict[str, str | None] = {
    "heads": LPU_AXIS,
    "kv_heads": LPU_AXIS,
    "ffn": LPU_AXIS,
    "vocab": LPU_AXIS,
}


VIRTUAL_CPU_DEVICES = 8


def is_pspec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def logical_to_spec(axes: tuple[str | None, ...]) -> PartitionSpec:
    """Logical axis names of an array -> its PartitionSpec under `LOGICAL_RULES`."""
    return PartitionSpec(*(LOGICAL_RULES.get(a) if a else None for a in axes))


# Logical axes of the KV cache's arrays: k and v are split over kv heads like the k/v projections.
CACHE_AXES = {
    "k": ("layers", "batch", "kv_heads", "seq", "head_dim"),
    "v": ("layers", "batch", "kv_heads", "seq", "head_dim"),
    "valid": ("batch", "seq"),
    "next_slot": (),
    "next_pos": ("batch",),
}


def param_partition_specs(cfg: ModelConfig) -> dict[str, Any]:
    """PartitionSpec of every declared weight (a pytree matching the params)."""
    return jax.tree.map(lambda s: logical_to_spec(s.axes), param_specs(cfg), is_leaf=is_spec)


def cache_partition_specs() -> Any:
    """PartitionSpecs of a `KVCache`, as a KVCache of specs."""
    from hdex_jax.kv_cache import KVCache

    return KVCache(**{name: logical_to_spec(axes) for name, axes in CACHE_AXES.items()})


def provide_virtual_devices(count: int = VIRTUAL_CPU_DEVICES) -> None:
    """Ask JAX for `count` virtual CPU devices if its backend has not started and the user chose no count.

    Called when hdex_jax is imported, so that every device count from 1 to 8 works later in the process.
    """
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized() or "xla_force_host_platform_device_count" in os.environ.get(
            "XLA_FLAGS", ""):
        return
    if jax.config.jax_num_cpu_devices < count:
        jax.config.update("jax_num_cpu_devices", count)


def ensure_devices(count: int) -> list[jax.Device]:
    """At least `count` devices, creating virtual CPU devices when the backend has not started yet."""
    provide_virtual_devices(max(count, VIRTUAL_CPU_DEVICES))
    devices = jax.devices()
    if len(devices) < count:
        raise RuntimeError(
            f"{count} devices are needed but JAX has {len(devices)} ({devices[0].platform}) and its backend has "
            f"already started, so no more can be created. Import hdex_jax (or call "
            f"jax.config.update('jax_num_cpu_devices', {count})) before anything else uses JAX, or set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before starting Python.")
    return devices


def make_mesh(num_device: int, first_device: int = 0) -> Mesh:
    """A 1-D mesh on axis "lpu" of the `num_device` devices starting at `first_device`."""
    if not isinstance(num_device, int) or isinstance(num_device, bool) or num_device < 1:
        raise ValueError(f"the number of LPU devices must be a positive integer, got {num_device!r}")
    devices = ensure_devices(first_device + num_device)
    return Mesh(np.asarray(devices[first_device:first_device + num_device]), (LPU_AXIS,))


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> dict[str, Any]:
    """NamedSharding for every declared weight of `cfg` (a pytree matching the params)."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_partition_specs(cfg), is_leaf=is_pspec)


def abstract_params(cfg: ModelConfig, mesh: Mesh) -> dict[str, Any]:
    """ShapeDtypeStruct leaves with their shardings: the restore target for orbax."""

    def leaf(spec: ParamSpec) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(spec.shape, spec.dtype,
                                    sharding=NamedSharding(mesh, logical_to_spec(spec.axes)))

    return jax.tree.map(leaf, param_specs(cfg), is_leaf=is_spec)


def device_put_params(params: Mapping[str, Any], cfg: ModelConfig, mesh: Mesh) -> dict[str, Any]:
    """Place a host param pytree onto the mesh following the rules."""
    return jax.tree.map(jax.device_put, dict(params), param_shardings(cfg, mesh))
