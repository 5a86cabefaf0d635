"""The decode kernel (`hdex_jax/matvec.py`, `hdex_jax/csrc/matvec.cc`): its products equal a float64 product for
every path through it (one row streamed, several rows in register tiles, tails of rows and columns, one product
split between cores, several products split whole, [K, N] and [N, K] weights); the programs call it where they
should; every weight format (float16, bfloat16 and quant.py's) is read as stored and gives float64 products of
the values it stands for; and a process that cannot build the kernel, or is told not to use it, falls back to XLA's
dot (dequantizing inside the program) with a notice and generates the same tokens.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hdex_jax import kernel_build, matvec, quant
from hdex_jax.kv_cache import init_cache
from hdex_jax.forward import decode_step_fn
from tests.helpers_tiny import save_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
KERNEL_CALL = f'custom_call_target="{kernel_build.TARGET}"'


def _hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def test_the_kernel_builds_here() -> None:
    # The suite's machines have a C++ compiler: a kernel that silently fell back would make the tests below
    # compare XLA with itself.
    assert kernel_build.registered() is not None
    assert list(Path(os.environ["HDEX_HOME"], "kernels").glob("matvec-*.so"))


# (batch, rows, K, N): rows 1 streams, 2-32 use register tiles (remainders of 4 rows at 3, 5, 17); K = 577 leaves a
# tail of rows after the groups of four; N = 70 and 1000 leave columns after the tiles; 600 x 800 floats (1.9 MB)
# is split between the cores, the batch of 3 x 256 x 64 is split by batch element.
CASES = [(1, 1, 577, 70), (1, 1, 600, 800), (1, 2, 64, 96), (1, 3, 577, 1000), (1, 5, 96, 64), (1, 8, 600, 800),
         (1, 17, 64, 130), (1, 32, 576, 960), (3, 3, 64, 256), (3, 3, 256, 64), (4, 1, 33, 5)]


@pytest.mark.parametrize("transposed", [False, True], ids=["kn", "nk"])
@pytest.mark.parametrize("batch,rows,K,N", CASES)
def test_kernel_equals_a_float64_product(batch: int, rows: int, K: int, N: int, transposed: bool) -> None:
    rng = np.random.default_rng(K * N + rows)
    x = rng.standard_normal((batch, rows, K), dtype=np.float32)
    w = rng.standard_normal((batch, N, K) if transposed else (batch, K, N), dtype=np.float32)
    if batch == 1:
        fn = lambda x, w: matvec.matmul(x[0], w[0], transposed=transposed)[None]  # noqa: E731
    else:
        fn = lambda x, w: matvec.batched_matmul(x, w, transposed=transposed)  # noqa: E731
    on_kernel = rows <= (matvec.MAX_ROWS if batch == 1 else matvec.MAX_ATTENTION_ROWS)
    assert (KERNEL_CALL in _hlo(fn, x, w)) == on_kernel
    got = np.asarray(jax.jit(fn)(x, w))
    expected = np.einsum("bmk,bnk->bmn" if transposed else "bmk,bkn->bmn", x.astype(np.float64),
                         w.astype(np.float64))
    # float32 sums of K products: error ~ sqrt(K) * eps * |x||w|, far below 1e-5 of the largest output.
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_more_rows_than_the_kernel_takes_use_xla() -> None:
    x = jnp.ones((matvec.MAX_ROWS + 1, 64), jnp.float32)
    w = jnp.ones((64, 96), jnp.float32)
    hlo = _hlo(matvec.matmul, x, w)
    assert KERNEL_CALL not in hlo and " dot(" in hlo
    np.testing.assert_array_equal(jax.jit(matvec.matmul)(x, w), np.full((matvec.MAX_ROWS + 1, 96), 64.0))


# Weight formats the kernel reads as stored: float16 and bfloat16 arrays, and quant.py's formats.
FLOAT_FORMATS = {"float16": jnp.float16, "bfloat16": jnp.bfloat16}
QUANT_FORMATS = ["q8_0", "q4_0", "q4_1", "int8", "int4"]
GGUF_TYPES = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}


def _stored(w: np.ndarray, fmt: str, transposed: bool) -> tuple[jax.Array | quant.QuantArray, np.ndarray]:
    """`w` ([K, N], or [N, K] when transposed) in `fmt`, and the float32 values it stands for."""
    if fmt in FLOAT_FORMATS:
        stored = jnp.asarray(w, FLOAT_FORMATS[fmt])
        return stored, np.asarray(stored, np.float32)
    axis = 1 if transposed else 0
    if fmt in GGUF_TYPES:  # GGUF's blocks, as a file stores them: rows [N, K] in blocks along K
        rows = w if transposed else w.T
        import gguf

        raw = gguf.quants.quantize(np.ascontiguousarray(rows), gguf.GGMLQuantizationType[GGUF_TYPES[fmt]])
        q = quant.from_gguf_blocks(raw, GGUF_TYPES[fmt], fmt, rows.shape, axis)
    else:
        q = quant.quantize(w, fmt, axis, (axis,))
    return jax.tree.map(jnp.asarray, q), quant.dequantize_np(q)


# (rows, K, N): rows 1 to 32 (remainders of the 4-row tiles at 2, 3, 5, 17); N = 70 and 130 leave columns after
# the tiles; K = 577 leaves inputs after the groups of 32 (formats without groups of 32 only); 576 x 1000 and
# 576 x 960 are split between the cores.
FORMAT_CASES = [(1, 64, 70), (1, 576, 1000), (2, 96, 64), (3, 577, 130), (5, 64, 130), (8, 160, 96),
                (17, 64, 130), (32, 576, 960)]


@pytest.mark.parametrize("transposed", [False, True], ids=["kn", "nk"])
@pytest.mark.parametrize("fmt", [*FLOAT_FORMATS, *QUANT_FORMATS])
def test_every_format_equals_a_float64_product_of_its_values(fmt: str, transposed: bool) -> None:
    rng = np.random.default_rng(len(fmt) + transposed)
    for rows, K, N in FORMAT_CASES:
        if K % quant.GROUP and fmt not in ("float16", "bfloat16", "int8"):
            continue
        x = rng.standard_normal((rows, K), dtype=np.float32)
        w, values = _stored(rng.standard_normal((N, K) if transposed else (K, N), dtype=np.float32), fmt,
                            transposed)
        fn = jax.jit(functools.partial(matvec.matmul, transposed=transposed))
        assert KERNEL_CALL in fn.lower(x, w).compile().as_text()
        got = np.asarray(fn(x, w))
        expected = x.astype(np.float64) @ (values.T if transposed else values).astype(np.float64)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max(),
                                   err_msg=f"{fmt} rows={rows} K={K} N={N}")


@pytest.mark.parametrize("transposed", [False, True], ids=["kn", "nk"])
@pytest.mark.parametrize("fmt", QUANT_FORMATS)
def test_the_kernel_dequantizes_to_quant_py_bits(fmt: str, transposed: bool) -> None:
    # Rows of x picking single inputs give the weights themselves, with no rounding of a sum: each must be the
    # float32 value quant.py computes (q4_1's d * q + m included), every nibble in its place.
    K, N = 96, 80
    rng = np.random.default_rng(7)
    w, values = _stored(rng.standard_normal((N, K) if transposed else (K, N), dtype=np.float32), fmt, transposed)
    inputs = np.array([0, 1, 15, 16, 17, 31, 32, 47, 48, 63, 70, 95])
    x = np.eye(K, dtype=np.float32)[inputs]  # [12, K]
    got = np.asarray(jax.jit(functools.partial(matvec.matmul, transposed=transposed))(x, w))
    np.testing.assert_array_equal(got, values[:, inputs].T if transposed else values[inputs])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("transposed", [False, True], ids=["kn", "nk"])
def test_attention_over_a_16_bit_cache_equals_a_float64_product(dtype: str, transposed: bool) -> None:
    # Attention's products at decode: per KV head, its query heads against the cache's [S, hd] keys or values.
    rng = np.random.default_rng(3)
    heads, rows, S, hd = 3, 3, 96, 64
    x = rng.standard_normal((heads, rows, hd if transposed else S), dtype=np.float32)
    cache = jnp.asarray(rng.standard_normal((heads, S, hd), dtype=np.float32), FLOAT_FORMATS[dtype])
    fn = jax.jit(functools.partial(matvec.batched_matmul, transposed=transposed))
    assert KERNEL_CALL in fn.lower(x, cache).compile().as_text()
    expected = np.einsum("bmk,bnk->bmn" if transposed else "bmk,bkn->bmn", x.astype(np.float64),
                         np.asarray(cache, np.float64))
    np.testing.assert_allclose(np.asarray(fn(x, cache)), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_16_bit_activations_give_16_bit_results_summed_in_float32() -> None:
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 576), dtype=np.float32), jnp.bfloat16)
    w, values = _stored(rng.standard_normal((576, 96), dtype=np.float32), "q4_1", False)
    y = jax.jit(matvec.matmul)(x, w)
    logits = jax.jit(functools.partial(matvec.matmul, preferred_element_type=jnp.float32))(x, w)
    assert y.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
    expected = np.asarray(x, np.float64) @ values.astype(np.float64)
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_array_equal(np.asarray(y), np.asarray(logits.astype(jnp.bfloat16)))


@pytest.mark.parametrize("fmt", ["float16", "q4_1", "int8"])
def test_a_quantized_product_reads_the_weight_as_stored(fmt: str) -> None:
    # No float32 copy of the weight in the program: only the stored fields go into the kernel's call.
    K, N = 576, 160
    w, _ = _stored(np.random.default_rng(5).standard_normal((K, N), dtype=np.float32), fmt, False)
    hlo = _hlo(matvec.matmul, jnp.ones((1, K), jnp.float32), w)
    assert hlo.count(KERNEL_CALL) == 1
    assert not re.search(rf"f32\[(1,)?{K},{N}\]", hlo), "a float32 copy of the weight"


@pytest.mark.parametrize("transposed", [False, True], ids=["kn", "nk"])
@pytest.mark.parametrize("fmt", ["float16", "q4_1", "int8"])
def test_converted_weights_stay_on_the_kernel_up_to_their_own_row_limit(fmt: str, transposed: bool) -> None:
    # XLA would convert the whole weight to float32 first (matvec.MAX_CONVERTED_ROWS, MAX_CONVERTED_NK_ROWS); the
    # kernel reads it as stored.
    rng = np.random.default_rng(7)
    K, N = 160, 96
    w, values = _stored(rng.standard_normal((N, K) if transposed else (K, N), dtype=np.float32), fmt, transposed)
    limit = matvec.MAX_CONVERTED_NK_ROWS if transposed else matvec.MAX_CONVERTED_ROWS
    x = rng.standard_normal((limit + 1, K), dtype=np.float32)
    fn = functools.partial(matvec.matmul, transposed=transposed)
    assert KERNEL_CALL in _hlo(fn, x[:-1], w) and KERNEL_CALL not in _hlo(fn, x, w)
    expected = x.astype(np.float64) @ (values.T if transposed else values).astype(np.float64)
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(x[:-1], w)), expected[:-1], rtol=0,
                               atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("fmt", [*FLOAT_FORMATS, *QUANT_FORMATS])
def test_xla_dequantizes_inside_the_program_with_the_same_results(fmt: str, monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    # Where XLA multiplies (more rows than the kernel takes, or no kernel: HDEX_MATVEC=0, no compiler), the
    # products equal the kernel's to float32 rounding.
    rng = np.random.default_rng(6)
    K, N = 160, 96
    w, values = _stored(rng.standard_normal((N, K), dtype=np.float32), fmt, True)
    x = rng.standard_normal((max(matvec.MAX_ROWS, matvec.MAX_CONVERTED_ROWS) + 1, K), dtype=np.float32)
    fn = functools.partial(matvec.matmul, transposed=True)
    expected = x.astype(np.float64) @ values.T.astype(np.float64)
    tolerance = 1e-5 * np.abs(expected).max()
    long = _hlo(fn, x, w)
    assert KERNEL_CALL not in long and " dot(" in long
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(x, w)), expected, rtol=0, atol=tolerance)
    short = np.asarray(jax.jit(fn)(x[:4], w))
    monkeypatch.setattr(kernel_build, "registered", lambda: None)  # what HDEX_MATVEC=0 and a missing compiler give
    fallback = functools.partial(matvec.matmul, transposed=True)  # a new function: not the traced one
    assert KERNEL_CALL not in _hlo(fallback, x[:4], w)
    np.testing.assert_allclose(np.asarray(jax.jit(fallback)(x[:4], w)), short, rtol=0, atol=tolerance)


def test_a_quantized_weight_packed_along_its_outputs_is_refused() -> None:
    w, _ = _stored(np.ones((64, 96), np.float32), "q8_0", False)
    with pytest.raises(ValueError, match="packed along its inputs"):
        matvec.matmul(jnp.ones((1, 64)), w, transposed=True)
    with pytest.raises(TypeError, match="batched_matmul: w must be a float32, float16 or bfloat16 array"):
        matvec.batched_matmul(jnp.ones((1, 1, 64)), w)


def test_every_weight_of_a_decode_step_goes_through_the_kernel(tmp_path: Path) -> None:
    from hdex_jax.transformers import AutoModelForCausalLM

    source = save_tiny_checkpoint("llama", tmp_path / "tiny-llama")
    placement = AutoModelForCausalLM.from_pretrained(str(source), device_map={"lpu": 1}).decode
    cfg = placement.cfg
    hlo = _hlo(lambda p, c, t: decode_step_fn(p, c, t, cfg, placement.mesh), placement.params,
               init_cache(cfg, 1, 32), jnp.zeros((1,), jnp.int32))
    # Per layer: q/k/v, o, gate/up, down, and attention's scores and values over the cache; then the LM head.
    assert hlo.count(KERNEL_CALL) == 6 * cfg.num_layers + 1
    # What XLA still multiplies: only each query head by the new token's key (a score per head, no weight).
    dots = re.findall(r"= f32\[([\d,]+)\]\S* dot\(", hlo)
    assert len(dots) == cfg.num_layers and all(math.prod(map(int, d.split(","))) == cfg.num_heads for d in dots)


SCRIPT = """
import json, sys
from hdex_jax import kernel_build, quant
from hdex_jax.tools import AutoCompiler
from hdex_jax.transformers import AutoModelForCausalLM

AutoCompiler().compile(model_id=sys.argv[1], num_device=1, max_length=64)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map={"lpu": 1})
out = model.generate([5, 6, 7, 8], max_new_tokens=12, do_sample=False, repetition_penalty=1.0, stop=[])
sampled = model.generate([[5, 6, 7, 8], [9, 10]], max_new_tokens=12, do_sample=True, top_k=0, top_p=0.9, seed=3)
print("RESULT", json.dumps({"kernel": kernel_build.registered(), "greedy": out, "sampled": sampled}), flush=True)
"""


def _run(source: Path, **env: str) -> tuple[dict, str]:
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(source)], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, **env}, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (line,) = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):]), run.stdout


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint("llama", tmp_path_factory.mktemp("matvec") / "tiny-llama")


@pytest.fixture(scope="module")
def with_kernel(tiny_source: Path, home: Path) -> dict:
    result, _ = _run(tiny_source)
    assert result["kernel"] is not None
    return result


@pytest.mark.parametrize("env,reason", [({"HDEX_MATVEC": "0"}, None),
                                        ({"CXX": "/nonexistent/c++"}, "the C++ compiler /nonexistent/c++ does not run")],
                         ids=["switched-off", "no-compiler"])
def test_without_the_kernel_the_tokens_are_the_same(tiny_source: Path, with_kernel: dict, env: dict,
                                                    reason: str | None) -> None:
    result, stdout = _run(tiny_source, **env)
    assert result["kernel"] is None
    if reason:
        assert f"the decode kernel is unavailable ({reason}" in stdout
    else:
        assert "kernel is unavailable" not in stdout
    assert result["greedy"] == with_kernel["greedy"]
    assert result["sampled"] == with_kernel["sampled"]
