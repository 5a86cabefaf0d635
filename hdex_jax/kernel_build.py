"""The decode kernel's library (`csrc/matvec.cc`, whose products `hdex_jax.matvec` calls): built, loaded and
registered as the XLA FFI target `TARGET` by `register`, once per process, from `hdex_jax.runtime.setup`, so that
tracing a program never compiles, loads or writes anything (`registered` only reads what `register` found).

The kernel is compiled with the machine's C++ compiler (`$CXX`, else `c++` or `g++`) against the XLA FFI headers
shipped in jaxlib, and kept in `$HDEX_HOME/kernels/` under a name that covers its source, jaxlib and the
compiler, so later processes only load it (a few ms). Without a compiler, or with `HDEX_MATVEC=0`, every product
is XLA's dot, said once: the same results to float32 rounding, only slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jaxlib

from hdex_jax import hub
from hdex_jax.atomic_files import scratch_path

TARGET = "hdex_matvec"
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
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise KernelUnavailable(f"the C++ compiler {compiler} does not run ({err})") from None
    what = [SOURCE.read_text(), jaxlib.__version__, compiler, version, " ".join(_FLAGS)]
    return f"matvec-{hashlib.sha256(chr(0).join(what).encode()).hexdigest()[:16]}.so"


def _kernel_dir() -> Path:
    """`$HDEX_HOME/kernels/`, or a private temporary directory when HDEX_HOME cannot be written."""
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
    print(f"[hdex] Building the decode kernel into {target.parent} (once per machine, under a minute)", flush=True)
    # A concurrent process sees the whole library or none.
    with scratch_path(target) as scratch:
        command = [compiler, *_FLAGS, "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", str(scratch)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as err:
            raise KernelUnavailable(f"{compiler} failed to run ({err})") from None
        if done.returncode != 0:
            lines = done.stderr.splitlines()
            first = next((line for line in lines if "error" in line), lines[-1] if lines else "no message")
            raise KernelUnavailable(f"{compiler} could not compile {SOURCE}: {first.strip()}")
    return target


_registering = threading.Lock()
_tried = False
_library: str | None = None


def register() -> str | None:
    """Build (unless kept), load and register the kernel, the first time it is called in this process; the
    library's name (which the exported programs are tied to), or None when every product is XLA's dot (said
    once, with the reason)."""
    global _tried, _library
    with _registering:
        if not _tried:
            _library = _load()
            _tried = True
    return _library


def registered() -> str | None:
    """The name of the library `register` registered in this process, or None (not registered, or unavailable):
    what tracing asks, without building or loading anything."""
    return _library


def _load() -> str | None:
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
