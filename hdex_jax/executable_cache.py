"""`inst/xla_cache/`: the XLA executables of a model's exported programs (`hdex_jax.exported_programs`), and JAX's
persistent compilation cache for the programs that trace.

XLA still compiles an exported program for the machine. The result, the executable itself, is kept beside the
model in `xla_cache/` (`Executable`): the first process that runs a program on a machine compiles and stores it
(a compile with fast_compile=False does it for every program), later ones load it without lowering or
compiling anything. Programs that trace (a shape the compile did not export, a hybrid prefill mesh, another
environment) use JAX's persistent compilation cache in the same directory (`use_xla_cache`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
from jax import export
from jax.sharding import Mesh

from hdex_jax.atomic_files import atomic_write

_said: set[str] = set()


def notice_once(message: str) -> None:
    """Print `message` as an hdex notice, the first time only."""
    if message not in _said:
        _said.add(message)
        print(f"[hdex] {message}", flush=True)


def xla_cache_dir(inst_dir: Path) -> Path:
    """The stored executables of a model's programs and JAX's persistent compilation cache: `inst/xla_cache/`,
    shared by its device counts."""
    return inst_dir.parent / "xla_cache"


def forget_executables(inst_dir: Path, num_device: int) -> None:
    """Delete the stored executables of `num_device` devices' programs (before their programs are replaced)."""
    for path in xla_cache_dir(inst_dir).glob(f"lpu{num_device}-*.xla"):
        path.unlink(missing_ok=True)


def executable_path(inst_dir: Path, program: str, compiled_from: list[str], mesh: Mesh, options: dict[str, Any]
                    ) -> Path:
    """Where the executable of the exported program file `program` of `inst_dir` (inst/lpu<N>/ or its scratch
    copy) is kept: named by what it was compiled from (`compiled_from`: the program's SHA-256 and the environment
    it was exported in) and for, so a changed program, jax, device set or XLA_FLAGS never loads an executable
    compiled for something else. (XLA itself refuses one built for another CPU.)"""
    what = [*compiled_from, repr(sorted(options.items())), os.environ.get("XLA_FLAGS", ""),
            ",".join(str(d.id) for d in mesh.devices.flat)]
    key = hashlib.sha256("\n".join(what).encode()).hexdigest()[:16]
    return xla_cache_dir(inst_dir) / f"lpu{mesh.devices.size}-{Path(program).stem}-{key}.xla"


class Executable:
    """The exported program in the file `program` run as the XLA executable kept at `path`: loaded from there
    when it is whole and was compiled for this machine, else compiled (with "advance" donating the state, as
    the traced one does) and stored there for the next process. Loading skips deserializing the exported
    program, jit's lowering of the call and the compile (docs/performance.md has the figures).

    The file holds the SHA-256 of the rest, checked before loading: a damaged one is compiled again, never run.
    It is a pickle (`jax.experimental.serialize_executable`): the model directory is as trusted as the code."""

    def __init__(self, program: Path, name: str, path: Path, mesh: Mesh, options: dict[str, Any],
                 exported: export.Exported | None = None):
        self.program, self.name, self.path, self.mesh, self.options = program, name, path, mesh, options
        self._exported = exported
        self._loaded: tuple[Any, Any] | None = None  # (executable, its input tree) read from `path`
        self._compiled: Any = None
        self._prefetching: threading.Thread | None = None

    def prefetch(self) -> None:
        """Start loading the stored executable in a background thread, so that it overlaps other work (the
        weights being read) instead of delaying the first call."""
        self._prefetching = threading.Thread(target=self._load, name=f"hdex-load-{self.path.name}")
        self._prefetching.start()

    def __call__(self, *args: Any) -> Any:
        if self._compiled is None:
            if self._prefetching is not None:
                self._prefetching.join()
            else:
                self._load()
            if self._loaded is not None and self._loaded[1] == jax.tree.structure((args, {})):
                self._compiled = self._loaded[0]
                # Marked used when it runs, not when it is loaded: a prefetch that guessed wrong must not make
                # its executable the next process's guess.
                with contextlib.suppress(OSError):
                    os.utime(self.path)
            else:
                self._compiled = self.compile(args)
        return self._compiled(*args)

    def _load(self) -> None:
        """Read the stored executable into `_loaded` if it is whole and loads here."""
        from jax.experimental import serialize_executable

        try:
            data = self.path.read_bytes()
        except OSError:
            return
        digest, payload = data[:32], data[32:]
        if hashlib.sha256(payload).digest() != digest:
            notice_once(f"{self.path} is damaged; compiling the program again")
            return
        serialized, in_tree, out_tree = pickle.loads(payload)
        try:
            executable = serialize_executable.deserialize_and_load(serialized, in_tree, out_tree,
                                                                   execution_devices=list(self.mesh.devices.flat))
        except Exception as error:  # compiled for another CPU or XLA: say so and compile for this one
            notice_once(f"{self.path} does not load here ({str(error).splitlines()[0][:200]}); compiling the "
                        "program again")
            return
        self._loaded = (executable, in_tree)

    def compile(self, args: tuple[Any, ...]) -> Any:
        """Compile for `args` (arrays or `jax.ShapeDtypeStruct`s with shardings) and store the executable; a
        directory that cannot be written (read-only HDEX_HOME) only loses the store."""
        from jax.experimental import serialize_executable

        exported = self._exported or export.deserialize(bytearray(self.program.read_bytes()))
        jitted = jax.jit(exported.call, donate_argnums=(1,) if self.name == "advance" else (),
                         compiler_options=self.options)
        with _without_persistent_cache():
            compiled = jitted.lower(*args).compile()
        payload = pickle.dumps(serialize_executable.serialize(compiled))
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, hashlib.sha256(payload).digest() + payload)
        return compiled


@contextlib.contextmanager
def _without_persistent_cache() -> Iterator[None]:
    """Compile afresh inside the block: an executable read from JAX's persistent cache serializes without its
    code (jaxlib 0.10.2: a later load fails with "Function ... not found"). JAX decides whether the cache is on
    once per process, so it is reset around the change."""
    from jax.experimental.compilation_cache import compilation_cache

    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()


# The cache directories `use_xla_cache` set (any other one was the user's).
_cache_dirs_set: set[str] = set()


def use_xla_cache(directory: Path) -> None:
    """Keep JAX's persistent compilation cache in `directory`, for every program this process compiles from now
    on (all sizes and compile times), unless the user set a cache directory of their own. A directory that
    cannot be created (read-only HDEX_HOME) leaves the cache off."""
    from jax.experimental.compilation_cache import compilation_cache

    current = jax.config.jax_compilation_cache_dir
    if current == str(directory) or (current and current not in _cache_dirs_set):
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    compilation_cache.reset_cache()
    _cache_dirs_set.add(str(directory))
