"""The matrix products of the forward pass: on the CPU, float32 products of up to `MAX_ROWS` rows (decode steps
and short prompts) run on the kernel of `csrc/matvec.cc`, the others on XLA's dot.

Decode reads every weight once per token, so its speed is the rate at which the products read their weights.
XLA CPU's products of SmolLM2's layer shapes read them at 15-21 GB/s where a plain stream reaches about 30; the
kernel streams each weight once, one contiguous piece per core, and reaches about 29; with several rows it keeps
blocks of the weight in L2 while register tiles of every row pass over them (docs/performance.md, "The
matrix-vector kernel"). It is an XLA FFI custom call, so it runs inside the jitted and exported programs like any
other operation.

The kernel is compiled on first use with the machine's C++ compiler (`$CXX`, else `c++` or `g++`) against the
XLA FFI headers shipped in jaxlib, and kept in `$HDEX_HOME/kernels/` under a name that covers its source, jaxlib
and the compiler, so later processes only load it (a few ms). Without a compiler, or with `HDEX_MATVEC=0`, every
product is XLA's dot, said once: the same results to float32 rounding, only slower.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

from hdex_jax import quant

TARGET = "hdex_matvec"
# Products with more rows (longer prompts) go to XLA's dot, which is as fast at 64 rows and faster beyond
# (docs/performance.md). Attention's products (one dot product per key for the scores) stop at fewer rows.
MAX_ROWS = 32
MAX_ATTENTION_ROWS = 8
SOURCE = Path(__file__).parent / "csrc" / "matvec.cc"
# -fopenmp-simd only lets the compiler vectorise the marked dot-product loop (no OpenMP runtime is linked);
# -Wno-psabi silences notes on the ABI of 64-byte vectors, which never cross a call.
# -ffp-contract=fast: ISO C++ modes otherwise keep every a * b + c as a multiply and an add, not one FMA.
_FLAGS = ["-O3", "-std=c++17", "-ffp-contract=fast", "-fPIC", "-shared", "-fopenmp-simd", "-Wno-psabi"]


class KernelUnavailable(RuntimeError):
    """The kernel could not be built or loaded here; the message says why."""


def _compiler() -> str:
    found = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not found:
        raise KernelUnavailable("no C++ compiler found (set CXX, or install g++)")
    return found


def _library_name(compiler: str) -> str:
    """Named by everything the build depends on, so a changed source, jaxlib or compiler builds anew."""
    import jaxlib

    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise KernelUnavailable(f"the C++ compiler {compiler} does not run ({err})") from None
    what = [SOURCE.read_text(), jaxlib.__version__, compiler, version, " ".join(_FLAGS)]
    return f"matvec-{hashlib.sha256(chr(0).join(what).encode()).hexdigest()[:16]}.so"


def _kernel_dir() -> Path:
    """`$HDEX_HOME/kernels/`, or a private temporary directory when HDEX_HOME cannot be written."""
    from hdex_jax import hub

    try:
        directory = hub.hdex_home(writable=True) / "kernels"
        directory.mkdir(exist_ok=True)
        return directory
    except (ValueError, OSError):
        return Path(tempfile.mkdtemp(prefix="hdex_kernels-"))


def build() -> Path:
    """The kernel's shared library: the one kept in `$HDEX_HOME/kernels/`, else compiled there now."""
    compiler = _compiler()
    target = _kernel_dir() / _library_name(compiler)
    if target.exists():
        return target
    # Compiled beside the target and renamed into place: a concurrent process sees the whole file or none.
    scratch = target.with_name(f".{target.name}.{platform.node()}-{os.getpid()}")
    print(f"[hdex] Building the decode kernel into {target.parent} (once per machine, a few seconds)", flush=True)
    command = [compiler, *_FLAGS, "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", str(scratch)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as err:
        raise KernelUnavailable(f"{compiler} failed to run ({err})") from None
    if done.returncode != 0:
        scratch.unlink(missing_ok=True)
        lines = done.stderr.splitlines()
        first = next((line for line in lines if "error" in line), lines[-1] if lines else "no message")
        raise KernelUnavailable(f"{compiler} could not compile {SOURCE}: {first.strip()}")
    os.replace(scratch, target)
    return target


_building = threading.Lock()


def kernel() -> str | None:
    """Build and register the kernel once per process; its library's name (which the exported programs are
    tied to), or None when every product is XLA's dot (said once, with the reason)."""
    with _building:
        return _kernel()


@functools.cache
def _kernel() -> str | None:
    if os.environ.get("HDEX_MATVEC", "1") == "0":
        return None
    try:
        library = build()
        handler = ctypes.cdll.LoadLibrary(str(library)).HdexMatvec
    except (KernelUnavailable, OSError, AttributeError) as err:
        print(f"[hdex] the decode kernel is unavailable ({err}); using XLA's matrix products, which are slower",
              flush=True)
        return None
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler), platform="cpu")
    return library.name


def _kernel_product(x: jax.Array, w: jax.Array, transposed: bool) -> jax.Array:
    # x: [B, M, K]; w: [B, K, N], or [B, N, K] when transposed -> [B, M, N]
    n = w.shape[1] if transposed else w.shape[2]
    out = jax.ShapeDtypeStruct((*x.shape[:2], n), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x, w, transposed=transposed)


def _dot(x: jax.Array, w: jax.Array, transposed: bool, preferred_element_type=None) -> jax.Array:
    """x [*batch, M, K] @ w [*batch, K, N] (or [*batch, N, K] when transposed) -> [*batch, M, N]; w without
    batch axes is one matrix for every row of x [..., K]."""
    batch = tuple(range(w.ndim - 2))
    contract = w.ndim - 1 if transposed else w.ndim - 2
    return lax.dot_general(x, w, (((x.ndim - 1,), (contract,)), (batch, batch)),
                           preferred_element_type=preferred_element_type)


def _on_kernel(x: jax.Array, w: jax.Array, rows: int, max_rows: int) -> bool:
    return rows <= max_rows and x.dtype == w.dtype == jnp.float32 and kernel() is not None


def _product(x: jax.Array, w: jax.Array, transposed: bool) -> jax.Array:
    # x: [B, M, K]; w: [B, K, N] or [B, N, K] -> [B, M, N], on the kernel on the CPU and XLA's dot elsewhere
    return lax.platform_dependent(x, w, cpu=functools.partial(_kernel_product, transposed=transposed),
                                  default=functools.partial(_dot, transposed=transposed))


def matmul(x: jax.Array, w: jax.Array, transposed: bool = False, preferred_element_type=None) -> jax.Array:
    """x [..., K] @ w [K, N] -> [..., N]; with `transposed`, w is [N, K] and is contracted on K as it is stored
    (a transpose inside the program would copy it every step). `preferred_element_type` as in `lax.dot_general`
    (the kernel's products are float32 already).

    On the CPU, float32 products of at most `MAX_ROWS` rows run on the kernel, the others on XLA's dot.
    """
    if quant.is_quant(w):
        w = quant.dequantize(w, x.dtype)
    *lead, K = x.shape
    rows = math.prod(lead)
    if not _on_kernel(x, w, rows, MAX_ROWS):
        return _dot(x, w, transposed, preferred_element_type)
    y = _product(x.reshape(1, rows, K), w[None], transposed)  # [1, rows, N]
    return y.reshape(*lead, y.shape[-1])


def batched_matmul(x: jax.Array, w: jax.Array, transposed: bool = False, preferred_element_type=None) -> jax.Array:
    """One product per leading index: x [*batch, M, K] @ w [*batch, K, N] -> [*batch, M, N] (w [*batch, N, K]
    when `transposed`): attention's products, on the kernel under the conditions of `matmul` but with at most
    `MAX_ATTENTION_ROWS` rows M."""
    *batch, M, K = x.shape
    if not _on_kernel(x, w, M, MAX_ATTENTION_ROWS):
        return _dot(x, w, transposed, preferred_element_type)
    y = _product(x.reshape(-1, M, K), w.reshape(-1, *w.shape[-2:]), transposed)  # [prod(batch), M, N]
    return y.reshape(*batch, M, y.shape[-1])
