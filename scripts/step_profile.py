"""Where a decode step's time goes, operation by operation.

    python scripts/step_profile.py [--model SmolLM2-135M-Instruct] [--slots 256] [--steps 20]

Runs the optimized one-device decode step of a compiled model (`jit(...).compile()`, the program
`op_cost.py` counts) `--steps` times under `jax.profiler`, and sums the duration XLA CPU records for each of
its thunks (one per fusion, dot, copy or kernel call). Matrix products (XLA's dots and the decode kernel's
calls, `hdex_jax/matvec.py`) are grouped by their shapes, with the bytes their
operands hold and the rate at which they read them; the other thunks by kind. The last lines compare the sum
with the step's wall time measured without the profiler: tracing adds a little to every thunk.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import math
import re
import tempfile
import time
from typing import Any

import jax

from hdex_jax import kernel_build
from op_cost import decode_step


@dataclasses.dataclass
class Group:
    """Thunks of one kind (or dots of one shape): how many ran and their summed duration."""

    count: int = 0
    nanoseconds: float = 0.0
    bytes_read: int = 0  # per thunk, for dots: the bytes of both operands


def _shape_bytes(shape: str) -> int:
    """Bytes of an HLO array shape such as `f32[576,960]{1,0}`."""
    dtype, dims = re.match(r"(\w+)\[([\d,]*)\]", shape).groups()
    bits = int(re.sub(r"\D", "", dtype) or 8)  # the width XLA writes in the name (f32, bf16, s8); pred is a byte
    return bits // 8 * math.prod(int(d) for d in dims.split(",") if d)


def dot_signatures(hlo: str) -> dict[str, tuple[str, int]]:
    """For every matrix product of an optimized HLO module (XLA's dots and the calls of hdex_jax's decode kernel,
    marked "kernel"): its name -> ("output <- operand x operand" shapes, operand bytes)."""
    shapes = dict(re.findall(r"%([\w.-]+) = (\w+\[[\d,]*\])", hlo))
    dots = {}
    pattern = r'%([\w.-]+) = (\w+\[[\d,]*\])\S* (dot|custom-call)\(([^)]*)\)(, custom_call_target="(\w+)")?'
    for name, out, op, operands, _, target in re.findall(pattern, hlo):
        if op == "custom-call" and target != kernel_build.TARGET:
            continue
        ins = [shapes[o.strip().lstrip("%")] for o in operands.split(",")]
        mark = " kernel" if op == "custom-call" else ""
        dots[name] = (f"{out} <- {' x '.join(ins)}{mark}", sum(_shape_bytes(s) for s in ins))
    return dots


def thunk_durations(xspace_file: str, dots: dict[str, tuple[str, int]]) -> dict[str, Group]:
    """Summed durations of the thunks in a profile, by dot signature or by kind (the name without its number)."""
    groups: dict[str, Group] = collections.defaultdict(Group)
    for plane in jax.profiler.ProfileData.from_file(xspace_file).planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):  # XLA's worker threads run the thunks; the rest is Python
                continue
            for event in line.events:
                if event.name.startswith(("ThunkExecutor::", "ThreadpoolListener::", "end: ")):
                    continue
                signature, read = dots.get(event.name, (re.sub(r"\.\d+$", "", event.name), 0))
                group = groups[signature]
                group.count += 1
                group.nanoseconds += event.duration_ns
                group.bytes_read = read
    return dict(groups)


def profile(compiled: Any, args: tuple, steps: int) -> tuple[dict[str, Group], float]:
    """Thunk durations of `steps` runs of `compiled(*args)` (whose second argument and output are the cache it
    donates) and the seconds per run without the profiler."""
    def run(args: tuple) -> tuple:
        params, cache, token = args
        for _ in range(steps):
            _, cache = compiled(params, cache, token)
        jax.block_until_ready(cache)
        return params, cache, token

    args = run(args)  # warm-up
    start = time.perf_counter()
    args = run(args)
    seconds = (time.perf_counter() - start) / steps
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            run(args)
        (xspace_file,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
        return thunk_durations(xspace_file, dot_signatures(compiled.as_text())), seconds


def report(groups: dict[str, Group], steps: int, wall_seconds: float) -> list[str]:
    """The table printed by `main`: per step, dots by shape, then the other thunks by kind."""
    lines = [f"{'ms/step':>8} {'per step':>8} {'us each':>8} {'MB each':>8} {'GB/s':>6}  matrix products"]
    dots = {k: g for k, g in groups.items() if "<-" in k}
    others = {k: g for k, g in groups.items() if "<-" not in k}
    for signature, g in sorted(dots.items(), key=lambda kv: -kv[1].nanoseconds):
        each = g.nanoseconds / g.count
        lines.append(f"{g.nanoseconds / steps / 1e6:8.3f} {g.count / steps:8.0f} {each / 1e3:8.1f} "
                     f"{g.bytes_read / 1e6:8.2f} {g.bytes_read / each:6.1f}  {signature}")
    lines.append(f"{'ms/step':>8} {'per step':>8} {'us each':>8}  other thunks")
    for kind, g in sorted(others.items(), key=lambda kv: -kv[1].nanoseconds):
        lines.append(f"{g.nanoseconds / steps / 1e6:8.3f} {g.count / steps:8.0f} {g.nanoseconds / g.count / 1e3:8.1f}"
                     f"  {kind}")
    dot_ms = sum(g.nanoseconds for g in dots.values()) / steps / 1e6
    other_ms = sum(g.nanoseconds for g in others.values()) / steps / 1e6
    thunks = sum(g.count for g in groups.values()) / steps
    lines.append(f"{thunks:.0f} thunks per step: matrix products {dot_ms:.2f} ms, the other thunks {other_ms:.2f} ms, "
                 f"sum {dot_ms + other_ms:.2f} ms (profiled); the step without the profiler: "
                 f"{wall_seconds * 1e3:.2f} ms")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    compiled, inputs = decode_step(args.model, args.slots)
    groups, seconds = profile(compiled, inputs, args.steps)
    print(f"{args.model} decode step, 1 device, {args.slots} slots, {args.steps} steps profiled, jax "
          f"{jax.__version__}")
    print("\n".join(report(groups, args.steps, seconds)))


if __name__ == "__main__":
    main()
