"""The decode kernel (`hdex_jax/matvec.py`, `hdex_jax/csrc/matvec.cc`): its products equal a float64 product for
every path through it (one row streamed, several rows in register tiles, tails of rows and columns, one product
split between cores, several products split whole, [K, N] and [N, K] weights); the programs call it where they
should; and a process that cannot build it, or is told not to use it, falls back to XLA's dot with a notice and
generates the same tokens.
"""

from __future__ import annotations

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

from hdex_jax import matvec
from hdex_jax.kv_cache import init_cache
from hdex_jax.model import decode_step_fn
from tests.helpers_tiny import save_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
KERNEL_CALL = f'custom_call_target="{matvec.TARGET}"'


def _hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def test_the_kernel_builds_here() -> None:
    # The suite's machines have a C++ compiler: a kernel that silently fell back would make the tests below
    # compare XLA with itself.
    assert matvec.kernel() is not None
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


def test_bfloat16_products_use_xla() -> None:
    x, w = jnp.ones((1, 64), jnp.bfloat16), jnp.ones((64, 96), jnp.bfloat16)
    assert KERNEL_CALL not in _hlo(matvec.matmul, x, w)


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
from hdex_jax import matvec
from hdex_jax.tools import AutoCompiler
from hdex_jax.transformers import AutoModelForCausalLM

AutoCompiler().compile(model_id=sys.argv[1], num_device=1, max_length=64)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map={"lpu": 1})
out = model.generate([5, 6, 7, 8], max_new_tokens=12, do_sample=False, repetition_penalty=1.0, stop=[])
sampled = model.generate([[5, 6, 7, 8], [9, 10]], max_new_tokens=12, do_sample=True, top_k=0, top_p=0.9, seed=3)
print("RESULT", json.dumps({"kernel": matvec.kernel(), "greedy": out, "sampled": sampled}), flush=True)
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
