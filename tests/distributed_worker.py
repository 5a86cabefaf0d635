"""One process of a multi-process generation, started by tests/test_distributed.py.

Usage: python distributed_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID LOCAL_DEVICES MODEL_ID REQUEST_JSON

REQUEST_JSON holds `device_maps`, `prompts` and `runs` (a list of `generate` keyword arguments). The worker joins
the cluster, loads the already compiled model with each device map (its meshes span every process), runs every
request and prints one JSON line: {"process": id, "tokens": [[one batch per run] per device map]}.
"""

from __future__ import annotations

import functools
import json
import sys


def _gloo_on_loopback() -> None:
    """Make JAX's gloo collectives listen on 127.0.0.1.

    By default gloo binds to the address this host's name resolves to, which may be a network interface (or
    not resolve at all); JAX has no public option for it, so the factory JAX calls is given the hostname.
    """
    from jax._src.lib import _jax

    _jax.make_gloo_tcp_collectives = functools.partial(_jax.make_gloo_tcp_collectives, hostname="127.0.0.1")


def main(argv: list[str]) -> None:
    coordinator, num_processes, process_id, local_devices, model_id, request_json = argv
    from hdex_jax import distributed

    _gloo_on_loopback()
    distributed.initialize(coordinator, int(num_processes), int(process_id), int(local_devices))

    from hdex_jax.transformers import AutoModelForCausalLM

    request = json.loads(request_json)
    tokens = []
    for device_map in request["device_maps"]:
        model = AutoModelForCausalLM.from_pretrained(model_id, device_map=device_map)
        tokens.append([model.generate(request["prompts"], **kwargs) for kwargs in request["runs"]])
    print(json.dumps({"process": int(process_id), "tokens": tokens}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
