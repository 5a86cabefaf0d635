"""The decode kernel's read rate in each weight format, on single products of SmolLM2's shapes.

    python scripts/kernel_formats.py [--rows 1] [--repeats 15] [--megabytes 128]

For each shape (K x N = 576 x 1536, 1536 x 576, 576 x 960 as [K, N] weights, and the tied LM head 49152 x 576
stored [N, K]) and each format (float32, float16, bfloat16, and quant.py's q8_0, q4_0, q4_1, int8, int4), one
jitted program multiplies `--rows` rows by enough distinct copies of the weight to hold `--megabytes` (more than
the last-level cache, so the weights come from memory, as at decode). The formats run alternately, `--repeats`
times; the table gives the median time per product, the bytes of one weight (scales included) over that time,
and the format's speed over float32's (the same product, so the ratio is of time); then the same from the
fastest run of each, which on a shared machine is the one least slowed by other processes.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from hdex_jax import kernel_build, matvec, quant, runtime

SHAPES = [(576, 1536, False), (1536, 576, False), (576, 960, False), (576, 49152, True)]
FLOATS = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}
FORMATS = [*FLOATS, *quant.FORMATS]


def _weight(w: np.ndarray, fmt: str, transposed: bool) -> np.ndarray | quant.QuantArray:
    """`w` in `fmt`, as numpy arrays."""
    if fmt in FLOATS:
        return np.asarray(jnp.asarray(w, FLOATS[fmt]))
    axis = 1 if transposed else 0
    return quant.quantize(w, fmt, axis, (axis,))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--megabytes", type=float, default=128)
    args = parser.parse_args()
    runtime.setup()
    print(f"kernel {kernel_build.registered()}, {args.rows} row(s), medians of {args.repeats} alternating runs, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}")
    print(f"{'K x N':>16} {'format':>9} {'MB':>7} {'us':>8} {'GB/s':>6} {'x f32':>6} | fastest: "
          f"{'us':>8} {'GB/s':>6} {'x f32':>6}")
    rng = np.random.default_rng(0)
    for K, N, transposed in SHAPES:
        base = rng.standard_normal((N, K) if transposed else (K, N), dtype=np.float32) * 0.05
        x = jnp.asarray(rng.standard_normal((args.rows, K), dtype=np.float32))
        runs = {}
        for fmt in FORMATS:
            one = _weight(base, fmt, transposed)
            copies = max(1, math.ceil(args.megabytes * 1e6 / one.nbytes))
            # Distinct copies (values shifted along the outputs), so no copy is read from the cache.
            weights = [jax.tree.map(lambda a, i=i: jnp.asarray(np.roll(a, i, axis=0 if transposed else -1)), one)
                       for i in range(copies)]

            @jax.jit
            def chain(x, weights):
                return sum(matvec.matmul(x, w, transposed=transposed)[0, :8].astype(jnp.float32)
                           for w in weights)

            chain(x, weights).block_until_ready()
            runs[fmt] = (chain, weights, copies, one.nbytes)
        times: dict[str, list[float]] = {fmt: [] for fmt in FORMATS}
        for _ in range(args.repeats):
            for fmt, (chain, weights, copies, _) in runs.items():
                start = time.perf_counter()
                chain(x, weights).block_until_ready()
                times[fmt].append((time.perf_counter() - start) / copies)
        median, fastest = np.median(times["float32"]), min(times["float32"])
        for fmt, (_, _, _, nbytes) in runs.items():
            t, best = np.median(times[fmt]), min(times[fmt])
            shape = f"{N}x{K} (NK)" if transposed else f"{K}x{N}"
            print(f"{shape:>16} {fmt:>9} {nbytes / 1e6:7.2f} {t * 1e6:8.1f} {nbytes / t / 1e9:6.1f} "
                  f"{median / t:6.2f} |          {best * 1e6:8.1f} {nbytes / best / 1e9:6.1f} {fastest / best:6.2f}")


if __name__ == "__main__":
    main()
