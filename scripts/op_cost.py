"""The fixed cost of one XLA CPU operation (thunk), and how many a model's decode step has.

    python scripts/op_cost.py [--model SmolLM2-135M-Instruct] [--slots 256]

First the optimized decode step of the compiled model on one device, counted by kind
(`jit(...).compile().as_text()`). Then chains of tiny RMS-norm-like steps on a [576] vector, which XLA cannot
fuse into fewer than three thunks each: the best of 30 runs divided by the thunk count is the cost of a thunk.
That cost grows with the program's size, so one chain has as many thunks as the decode step, a short one (100
steps) shows the difference, and the same number of steps as the iterations of a loop over a 10-step body shows
what a small program that repeats itself costs. The step's thunks times the cost at its size is the part of a
decode step that is fixed cost, whatever the bytes read (docs/performance.md).
"""

from __future__ import annotations

import argparse
import collections
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


def computation_thunks(hlo: str, computation: str = "ENTRY") -> collections.Counter:
    """Operations of one computation of an optimized HLO module (the entry by default), by kind (fusions by
    their kind)."""
    counts: collections.Counter = collections.Counter()
    body = hlo[re.search(rf"^{re.escape(computation)}\b.*{{$", hlo, re.MULTILINE).end():]
    for line in body[:body.index("\n}")].splitlines():
        found = re.search(r"= \S+ ([\w-]+)\(", line)
        if found is None or found.group(1) in ("parameter", "constant", "bitcast", "get-tuple-element", "tuple"):
            continue
        kind = re.search(r'"kind":"(\w+)"', line) or re.search(r"kind=(\w+)", line)
        counts[f"{found.group(1)} {kind.group(1)}" if kind else found.group(1)] += 1
    return counts


def thunk_cost(steps: int, repeats: int = 1, runs: int = 30) -> tuple[float, int]:
    """Seconds per executed thunk of a chain of `steps` tiny dependent steps, run straight (repeats 1) or as the
    body of a `fori_loop` of `repeats` iterations, and the program's thunk count (the loop body's for a loop)."""
    def chain(x: jax.Array) -> jax.Array:
        for _ in range(steps):
            x = x * lax.rsqrt(jnp.mean(x * x) + 1e-6) + 0.001
        return x

    program = chain if repeats == 1 else lambda x: lax.fori_loop(0, repeats, lambda i, x: chain(x), x)
    x = jnp.ones((576,), jnp.float32)
    compiled = jax.jit(program).lower(x).compile()
    hlo = compiled.as_text()
    loop = re.search(r"while\(.*body=(%?[\w.-]+)", hlo)
    thunks = sum(computation_thunks(hlo, "ENTRY" if repeats == 1 else loop.group(1)).values())
    compiled(x).block_until_ready()
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        compiled(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best / (thunks * repeats), thunks


def decode_step(model_id: str, slots: int) -> tuple[Any, tuple]:
    """The optimized one-device decode step of `model_id` (compiled if needed) with `slots` cache slots, and its
    inputs (params, an empty cache, which it donates, and a token)."""
    from hdex_jax.kv_cache import init_cache
    from hdex_jax.forward import decode_step_fn
    from hdex_jax.jitting import COMPILER_OPTIONS
    from hdex_jax.transformers import AutoModelForCausalLM

    placement = AutoModelForCausalLM.from_pretrained(model_id, device_map={"lpu": 1}).decode
    step = jax.jit(lambda params, cache, token: decode_step_fn(params, cache, token, placement.cfg, placement.mesh),
                   donate_argnums=1, compiler_options=COMPILER_OPTIONS)
    inputs = (placement.params, init_cache(placement.cfg, 1, slots), jnp.zeros((1,), jnp.int32))
    return step.lower(*inputs).compile(), inputs


def decode_thunks(model_id: str, slots: int) -> collections.Counter:
    """Thunks of the optimized one-device decode step of `model_id` (compiled if needed) with `slots` cache slots."""
    compiled, _ = decode_step(model_id, slots)
    return computation_thunks(compiled.as_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--slots", type=int, default=256)
    args = parser.parse_args()
    counts = decode_thunks(args.model, args.slots)
    total = sum(counts.values())
    print(f"{args.model} decode step, 1 device, {args.slots} slots: {total} thunks "
          f"({', '.join(f'{n} {kind}' for kind, n in counts.most_common())})", flush=True)
    for steps in (100, round(total / 3)):
        cost, thunks = thunk_cost(steps)
        print(f"{steps} tiny steps: {thunks} thunks, {cost * 1e6:.2f} us per executed thunk (best of 30 runs)",
              flush=True)
    looped, body = thunk_cost(10, repeats=round(total / 30))
    print(f"{round(total / 30)} loop iterations of 10 tiny steps: {body} thunks per iteration, {looped * 1e6:.2f} us "
          "per executed thunk (best of 30 runs)", flush=True)
    # `cost` is the last straight chain's: the one of the decode step's size.
    print(f"fixed cost at {cost * 1e6:.2f} us per thunk (the straight chain of the decode step's size): "
          f"{total * cost * 1e3:.1f} ms per token")


if __name__ == "__main__":
    main()
