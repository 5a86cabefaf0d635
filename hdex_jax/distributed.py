"""Past one machine: one mesh of emulated LPU devices spanning several processes, through `jax.distributed`.

Every process runs the same script with the same arguments (model, device_map, prompts, sampling, seed),
calling `initialize` first, before anything else uses JAX:

```python
from hdex_jax import distributed
distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=rank, local_device_count=2)

from hdex_jax.transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(model_id, device_map={"lpu": 4})  # spans both processes
tokens = model.generate(ids, max_new_tokens=16, seed=0)  # every process gets the same tokens
```

The inputs must be the same in every process, because the host values handed to the jitted programs are
taken as the one global value (a `generate` without a seed uses process 0's random seed). Every mesh takes
an equal share of each process's devices, in process order: with P processes, `{"lpu": N}` uses the first
N / P devices of each, and the hybrid split `{"gpu": G, "lpu": L}` the next G / P for prefill, so the counts
must be multiples of P. A mesh must span every process anyway: a process that holds none of its devices
cannot take part in its programs.

Cross-process collectives (the ESL sync) run on CPU over gloo TCP; gloo listens on the address this host's
name resolves to. A loopback coordinator address ("127.0.0.1:port") means a cluster on one machine, and the
coordinator then listens on loopback only.

Compile before starting the processes (`AutoCompiler().compile(model_id, num_device=N)` once, into an
`HDEX_HOME` every process can read): compiling writes the artifact directories, and several processes
compiling the same model into one `HDEX_HOME` at once would race on them. `from_pretrained` then only
restores, each process reading the shards of its own devices.
"""

from __future__ import annotations

import ipaddress

import jax

from hdex_jax import runtime


def initialize(coordinator_address: str, num_processes: int, process_id: int,
               local_device_count: int | None = None) -> None:
    """Join this process to a multi-process JAX cluster whose devices form one LPU mesh.

    Args:
        coordinator_address: "host:port" of the coordinator, which process 0 serves; the same in every process.
        num_processes: how many processes take part.
        process_id: this process's rank in [0, num_processes).
        local_device_count: how many (virtual) CPU devices this process contributes; None keeps the count
            already configured (hdex_jax's default of 8 virtual CPU devices, or `jax_num_cpu_devices`).

    Raises:
        RuntimeError: JAX's backend has already started (the device count and the collectives are fixed when
            it starts) or `jax.distributed` is already initialized.
        ValueError: a count or rank is out of range.
    """
    from jax._src import xla_bridge

    if not isinstance(num_processes, int) or isinstance(num_processes, bool) or num_processes < 1:
        raise ValueError(f"num_processes must be a positive integer, got {num_processes!r}")
    if not isinstance(process_id, int) or isinstance(process_id, bool) or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be an integer in [0, {num_processes}), got {process_id!r}")
    if local_device_count is not None and (not isinstance(local_device_count, int)
                                           or isinstance(local_device_count, bool) or local_device_count < 1):
        raise ValueError(f"local_device_count must be a positive integer or None, got {local_device_count!r}")
    if jax.distributed.is_initialized():
        raise RuntimeError("jax.distributed is already initialized in this process; call "
                           "hdex_jax.distributed.initialize only once, instead of jax.distributed.initialize")
    if xla_bridge.backends_are_initialized():
        raise RuntimeError("JAX's backend has already started in this process, so it can no longer join a "
                           "multi-process cluster: call hdex_jax.distributed.initialize(...) before anything "
                           "uses JAX devices or arrays (right after the imports)")
    # Before the cluster starts, so that local_device_count=None keeps the 8 virtual devices setup asks for.
    runtime.setup()
    # Gloo is JAX's TCP implementation of cross-process collectives on CPU; without one, a computation whose
    # mesh spans processes cannot run its psum / all_gather.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if local_device_count is not None:
        jax.config.update("jax_num_cpu_devices", local_device_count)
    # JAX's coordinator listens on every interface by default; a cluster on one machine needs none but loopback.
    bind = coordinator_address if _is_loopback(coordinator_address) else None
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, coordinator_bind_address=bind)


def _is_loopback(address: str) -> bool:
    """Whether "host:port" names this machine's loopback ("localhost", 127.x.x.x, [::1])."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
