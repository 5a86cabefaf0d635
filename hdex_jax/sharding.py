"""Emulated LPU devices as a JAX mesh, and the one table that maps logical axes to mesh axes.

Every `PartitionSpec` in hdex_jax is derived from `LOGICAL_RULES` and the logical axes each weight declares
(`hdex_jax.params.param_specs`); none is written by hand elsewhere.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hdex_jax.config import ModelConfig
from hdex_jax.kv_cache import KVCache
from hdex_jax.params import ParamSpec, is_spec, runtime_layout, runtime_specs
from hdex_jax.validation import VIRTUAL_CPU_DEVICES, check_num_device

LPU_AXIS = "lpu"

# Megatron layout: heads, kv heads, ffn and vocab are split over the LPU devices; everything else is replicated.
LOGICAL_RULES: dict[str, str | None] = {
    "devices": LPU_AXIS,  # the device axis of fused weights (`params.runtime_specs`)
    "heads": LPU_AXIS,
    "kv_heads": LPU_AXIS,
    "ffn": LPU_AXIS,
    "vocab": LPU_AXIS,
}


def is_pspec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def logical_to_spec(axes: tuple[str | None, ...]) -> PartitionSpec:
    """Logical axis names of an array -> its PartitionSpec under `LOGICAL_RULES`."""
    return PartitionSpec(*(LOGICAL_RULES.get(a) if a else None for a in axes))


# Logical axes of the KV cache's arrays: each layer's k and v are split over kv heads like the k/v projections.
LAYER_CACHE_AXES = ("batch", "kv_heads", "seq", "head_dim")
CACHE_AXES = {"valid": ("batch", "seq"), "next_slot": (), "next_pos": ("batch",)}


def _partition_spec(spec: ParamSpec) -> Any:
    """A weight's PartitionSpec; a quantized weight's is a QuantArray of its fields' (scales split with their
    rows)."""
    if spec.format is None:
        return logical_to_spec(spec.axes)
    return jax.tree.map(lambda s: logical_to_spec(s.axes), spec.field_specs(), is_leaf=is_spec)


def _partition_specs(specs: Any) -> Any:
    return jax.tree.map(_partition_spec, specs, is_leaf=is_spec)


def param_partition_specs(cfg: ModelConfig, num_device: int) -> dict[str, Any]:
    """PartitionSpec of every weight in the form the forward pass reads on `num_device` devices
    (`params.runtime_specs`)."""
    return _partition_specs(runtime_specs(cfg, num_device))


def cache_partition_specs(cfg: ModelConfig) -> Any:
    """PartitionSpecs of a `KVCache` of `cfg`, as a KVCache of specs."""
    per_layer = (logical_to_spec(LAYER_CACHE_AXES),) * cfg.num_layers
    return KVCache(k=per_layer, v=per_layer, **{name: logical_to_spec(axes) for name, axes in CACHE_AXES.items()})


def provide_virtual_devices(count: int = VIRTUAL_CPU_DEVICES) -> None:
    """Ask JAX for `count` virtual CPU devices if its backend has not started and the user chose no count.

    Called by `hdex_jax.runtime.setup`, so that every device count from 1 to 8 works later in the process.
    A multi-process cluster keeps the per-process count `hdex_jax.distributed.initialize` chose.
    """
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized() or jax.distributed.is_initialized() or (
            "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")):
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
            f"already started, so no more can be created. Call hdex_jax.runtime.setup() (or "
            f"jax.config.update('jax_num_cpu_devices', {count})) before anything else uses JAX, or set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before starting Python.")
    return devices


def make_mesh(num_device: int, first_device: int = 0) -> Mesh:
    """A 1-D mesh on axis "lpu" of the `num_device` devices starting at `first_device`.

    In a multi-process cluster (`jax.distributed`), device indices count per process instead: every process
    contributes its local devices [first_device / P, (first_device + num_device) / P) of P processes.
    """
    num_device = check_num_device("num_device", num_device)
    if jax.distributed.is_initialized():
        return Mesh(np.asarray(_devices_of_every_process(num_device, first_device)), (LPU_AXIS,))
    devices = ensure_devices(first_device + num_device)
    return Mesh(np.asarray(devices[first_device:first_device + num_device]), (LPU_AXIS,))


def _devices_of_every_process(num_device: int, first_device: int) -> list[jax.Device]:
    """An equal share of each process's devices, in process order.

    Every mesh must span every process, since a process that holds none of a mesh's devices cannot take part
    in its programs; equal shares also keep the hybrid split's two meshes side by side in each process.
    """
    processes, local = jax.process_count(), jax.local_device_count()
    if num_device % processes or first_device % processes:
        raise ValueError(f"{num_device} device(s) from device {first_device} cannot be split evenly over "
                         f"{processes} processes: in a multi-process cluster every device count of the "
                         f"device_map must be a multiple of the number of processes")
    start, count = first_device // processes, num_device // processes
    if start + count > local:
        raise RuntimeError(f"{first_device + num_device} devices over {processes} processes need {start + count} "
                           f"devices per process, but this process has {local}; give each process more devices "
                           f"(hdex_jax.distributed.initialize(..., local_device_count={start + count}))")
    return [d for p in range(processes) for d in jax.local_devices(process_index=p)[start:start + count]]


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> dict[str, Any]:
    """NamedSharding for every weight of `cfg` in the form the forward pass reads."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_partition_specs(cfg, mesh.size),
                        is_leaf=is_pspec)


def runtime_params(stacked: Mapping[str, Any], cfg: ModelConfig, mesh: Mesh) -> dict[str, Any]:
    """Stacked params (host arrays, or restored onto `mesh`) -> per-layer params placed on `mesh` by the rules:
    the form the forward pass reads."""
    # One program slices every layer out (eager slicing would compile one small program per weight and layer).
    layout = functools.partial(runtime_layout, num_device=mesh.size)
    return jax.jit(layout, out_shardings=param_shardings(cfg, mesh))(dict(stacked))
