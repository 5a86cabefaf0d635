"""The fixed cost of one XLA CPU operation (thunk), and how many a model's decode step has.

    python scripts/op_cost.py [--model SmolLM2-135M-Instruct] [--slots 256]

First a chain of 500 tiny RMS-norm-like steps on a [576] vector, which XLA cannot fuse into fewer than three
thunks each: the best of 30 runs divided by the thunk count is the cost of a thunk. Then the optimized decode
step of the compiled model on one device, counted by kind (`jit(...).compile().as_text()`). Their product is the
part of a decode step that is fixed cost, whatever the bytes read (docs/performance.md).
"""

from __future__ import annotations

import argparse
import collections
import re
import time

import jax
import jax.numpy as jnp
from jax import lax


def entry_thunks(hlo: str) -> collections.Counter:
    """Operations of the entry computation of an optimized HLO module, by kind (fusions by their kind)."""
    counts: collections.Counter = collections.Counter()
    for line in hlo[hlo.index("ENTRY"):].splitlines():
        found = re.search(r"= \S+ ([\w-]+)\(", line)
        if found is None or found.group(1) in ("parameter", "constant", "bitcast", "get-tuple-element", "tuple"):
            continue
        kind = re.search(r'"kind":"(\w+)"', line) or re.search(r"kind=(\w+)", line)
        counts[f"{found.group(1)} {kind.group(1)}" if kind else found.group(1)] += 1
    return counts


def thunk_cost(steps: int = 500, runs: int = 30) -> tuple[float, int]:
    """Seconds per thunk of a chain of `steps` tiny dependent steps, and the chain's thunk count."""
    def chain(x: jax.Array) -> jax.Array:
        for _ in range(steps):
            x = x * lax.rsqrt(jnp.mean(x * x) + 1e-6) + 0.001
        return x

    x = jnp.ones((576,), jnp.float32)
    compiled = jax.jit(chain).lower(x).compile()
    thunks = sum(entry_thunks(compiled.as_text()).values())
    compiled(x).block_until_ready()
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        compiled(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best / thunks, thunks


def decode_thunks(model_id: str, slots: int) -> collections.Counter:
    """Thunks of the optimized one-device decode step of `model_id` (compiled if needed) with `slots` cache slots."""
    from hdex_jax.kv_cache import init_cache
    from hdex_jax.model import COMPILER_OPTIONS, decode_step_fn
    from hdex_jax.transformers import AutoModelForCausalLM

    placement = AutoModelForCausalLM.from_pretrained(model_id, device_map={"lpu": 1}).decode
    step = jax.jit(lambda params, cache, token: decode_step_fn(params, cache, token, placement.cfg, placement.mesh),
                   donate_argnums=1, compiler_options=COMPILER_OPTIONS)
    cache = init_cache(placement.cfg, 1, slots)
    hlo = step.lower(placement.params, cache, jnp.zeros((1,), jnp.int32)).compile().as_text()
    return entry_thunks(hlo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--slots", type=int, default=256)
    args = parser.parse_args()
    cost, thunks = thunk_cost()
    print(f"chain of tiny steps: {thunks} thunks, {cost * 1e6:.1f} us per thunk (best of 30 runs)")
    counts = decode_thunks(args.model, args.slots)
    total = sum(counts.values())
    print(f"{args.model} decode step, 1 device, {args.slots} slots: {total} thunks "
          f"({', '.join(f'{n} {kind}' for kind, n in counts.most_common())})")
    print(f"fixed cost at {cost * 1e6:.1f} us per thunk: {total * cost * 1e3:.1f} ms per token")


if __name__ == "__main__":
    main()
