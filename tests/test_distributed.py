"""Past one machine: two processes on loopback, each with 2 CPU devices, generate on one 4-device mesh (and on
the hybrid split's two 2-device meshes) and get the tokens one process with 4 devices gets."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from hdex_jax import distributed
from hdex_jax.tools import AutoCompiler
from hdex_jax.transformers import AutoModelForCausalLM
from tests.helpers_tiny import save_tiny_checkpoint

MAX_LENGTH = 64
PROCESSES = 2
LOCAL_DEVICES = 2
TIMEOUT_S = 300  # for the whole cluster: start, load, generate, exit
WORKER = Path(__file__).with_name("distributed_worker.py")
PROMPTS = [[3, 17, 42, 9, 5], [8, 6, 7]]
RUNS = [dict(max_new_tokens=16, do_sample=False),
        dict(max_new_tokens=16, do_sample=True, top_k=50, top_p=0.9, temperature=0.8, seed=7)]
DEVICE_MAPS = [{"lpu": 4}, {"gpu": 2, "lpu": 2}]


@pytest.fixture(scope="module")
def checkpoint(home, tmp_path_factory):
    """A tiny llama, compiled here for every device count the workers use: they only restore."""
    directory = save_tiny_checkpoint("llama", tmp_path_factory.mktemp("ckpt") / "tiny-llama")
    for num_device in (4, 2):
        AutoCompiler().compile(str(directory), num_device=num_device, max_length=MAX_LENGTH)
    return str(directory)


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_env(home: Path) -> dict[str, str]:
    """The parent's environment without its 8-device XLA flag: each worker asks for its own 2 devices."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    return {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu", "HDEX_HOME": str(home)}


def _run_cluster(checkpoint: str, home: Path, logs: Path) -> list[dict]:
    """Start the workers, wait for all of them within TIMEOUT_S, return each one's JSON result.

    A worker that fails ends the run at once (the others would wait for it in their collectives); whatever
    is still alive at the end is killed.
    """
    coordinator = f"127.0.0.1:{_free_loopback_port()}"
    request = json.dumps({"device_maps": DEVICE_MAPS, "prompts": PROMPTS, "runs": RUNS})
    procs = []
    try:
        for rank in range(PROCESSES):
            # Files, not pipes: a worker blocked on a full pipe would stall the collectives of the others.
            with (logs / f"worker{rank}.out").open("w") as out, (logs / f"worker{rank}.err").open("w") as err:
                procs.append(subprocess.Popen(
                    [sys.executable, str(WORKER), coordinator, str(PROCESSES), str(rank), str(LOCAL_DEVICES),
                     checkpoint, request], stdout=out, stderr=err, env=_worker_env(home)))
        deadline = time.monotonic() + TIMEOUT_S
        while None in (codes := [p.poll() for p in procs]) and not any(codes):
            if time.monotonic() > deadline:
                pytest.fail(f"the workers did not finish within {TIMEOUT_S}s:\n{_logs(logs)}")
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    codes = [p.returncode for p in procs]
    assert codes == [0] * PROCESSES, f"worker exit codes {codes}:\n{_logs(logs)}"
    return [json.loads((logs / f"worker{rank}.out").read_text().strip().splitlines()[-1])
            for rank in range(PROCESSES)]


def _logs(logs: Path) -> str:
    return "\n".join(f"--- worker{rank}.err\n{(logs / f'worker{rank}.err').read_text()[-3000:]}"
                     for rank in range(PROCESSES))


def test_two_processes_generate_the_tokens_of_one(checkpoint, home, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"lpu": 4})
    expected = [model.generate(PROMPTS, **kwargs) for kwargs in RUNS]
    results = _run_cluster(checkpoint, home, tmp_path)
    assert [r["process"] for r in results] == list(range(PROCESSES))
    for result in results:
        for device_map, tokens in zip(DEVICE_MAPS, result["tokens"]):
            assert tokens == expected, (result["process"], device_map)


def test_initialize_refuses_a_started_backend():
    jax.devices()  # starts the backend, which fixes the device count and the collectives
    with pytest.raises(RuntimeError, match="backend has already started"):
        distributed.initialize("127.0.0.1:1", num_processes=2, process_id=0, local_device_count=2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_processes=0, process_id=0), "num_processes"),
    (dict(num_processes=2, process_id=2), "process_id"),
    (dict(num_processes=2, process_id=0, local_device_count=0), "local_device_count"),
])
def test_initialize_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        distributed.initialize("127.0.0.1:1", **kwargs)
