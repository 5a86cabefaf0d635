"""`inst/lpu<N>/`: the compiled programs of a model, so a fresh process runs them without tracing its Python.

Phase 4 of the compile exports, with `jax.export`, the three programs `generate` runs (`generation.PROGRAMS`:
"generate", a whole generation, prefill to last token; "start", prefill and the first token, and "advance", one
decode step, for streaming) for the device count's mesh and each bucket of the compile (`buckets`), and writes them
with a manifest: jax and jaxlib versions, platform, mesh shape, buckets, each program's input and output shapes
and dtypes, and (through `artifacts.staged`) every file's hash. `load` reads them back as `Programs`; a call
whose shapes fall outside the exported buckets, a hybrid prefill mesh, or a jax version or platform other than
the compile's, traces as before (the last with a notice, once). Exported programs are the same computation as
the traced ones, so the tokens are the same either way.

XLA still compiles an exported program for the machine. The result, the executable itself, is kept beside the
model in `xla_cache/` (`Executable`): the first process that runs a program on a machine compiles and stores it
(a compile with fast_compile=False does it for every program), later ones load it without lowering or
compiling anything. Programs that trace (the cases above) use JAX's persistent compilation cache in the same
directory (`use_xla_cache`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import pickle
import platform
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax import export
from jax.sharding import Mesh

from hdex_jax import artifacts, matvec
from hdex_jax.atomic_files import atomic_write
from hdex_jax.generation import PROGRAMS, Batch, Placement, prepare_batch
from hdex_jax.model import compiler_options

# Bumped when the programs' inputs or outputs change, so an old inst/ is rewritten rather than misread.
FORMAT = 2
# Stop-id slots of the exported programs: up to 4 stop ids per row (generation's smallest stop bucket).
STOP_SLOTS = 4
# fast_compile=True exports prompt buckets up to this many tokens.
FAST_PROMPT_LIMIT = 128

@dataclasses.dataclass(frozen=True, order=True)
class Bucket:
    """The static shapes of one set of programs: batch rows, prompt bucket, cache slots, stop-id slots."""

    batch: int
    prompt: int
    cache: int
    stop_slots: int = STOP_SLOTS

    def file(self, program: str) -> str:
        return f"{program}-b{self.batch}-t{self.prompt}-s{self.cache}-k{self.stop_slots}.jaxexport"


def buckets(max_length: int, fast_compile: bool) -> list[Bucket]:
    """The buckets a compile exports: batch 1, prompt buckets T (powers of two from 16), cache lengths 2T and
    4T (up to max_length); fast_compile=True stops at prompt bucket 128, False goes on to max_length and also
    exports cache length 8T.

    Which generate calls they serve: one prompt, up to 4 stop ids, and a prompt bucket plus new tokens within
    the cache length (e.g. a 40-token prompt, bucket 64, with up to 192 new tokens). Others trace.
    """
    factors = (2, 4) if fast_compile else (2, 4, 8)
    limit = FAST_PROMPT_LIMIT if fast_compile else max_length
    found = []
    prompt = 16
    while prompt <= limit and 2 * prompt <= max_length:
        found += [Bucket(1, prompt, f * prompt) for f in factors if f * prompt <= max_length]
        prompt *= 2
    return found


def bucket_of(batch: Batch) -> Bucket:
    return Bucket(batch.tokens.shape[0], batch.plan.prompt_bucket, batch.plan.cache_length,
                  batch.request.stop_ids.shape[1])


def _example_batch(bucket: Bucket, max_length: int) -> Batch:
    """A batch with exactly `bucket`'s shapes, through the same path generate takes (`prepare_batch`)."""
    batch = prepare_batch([[0] * bucket.prompt] * bucket.batch, max_length=max_length,
                          max_new_tokens=bucket.cache - bucket.prompt, stop=list(range(bucket.stop_slots)),
                          pad_id=0, seed=0)
    assert bucket_of(batch) == bucket, (bucket, bucket_of(batch))
    return batch


def _spec(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))


def _avals(avals: Any) -> list[list[Any]]:
    return [[list(a.shape), str(a.dtype)] for a in avals]


def export_programs(placement: Placement, max_length: int, wanted: list[Bucket], directory: Path,
                    precompile: bool = False) -> dict[str, Any]:
    """Export the programs of every bucket in `wanted` for `placement`'s mesh into `directory`; return the
    manifest (without the file hashes, which `artifacts.staged` adds). `precompile` also compiles each program
    and stores its executable in `xla_cache_dir(directory)`, so even the first run after the compile skips
    XLA; `directory` is then the final `inst/lpu<N>/` path or a scratch directory beside it."""
    params = jax.tree.map(_spec, placement.params)
    static = dict(cfg=placement.cfg, mesh=placement.mesh)
    programs = {}
    for bucket in wanted:
        batch = _example_batch(bucket, max_length)
        request = jax.tree.map(_spec, batch.request)
        prompt = (params, _spec(batch.tokens), _spec(batch.mask), request)
        tokens = batch.plan.prompt_bucket
        start = _export(PROGRAMS["start"][tokens])(*prompt, plan=batch.plan, record=False, **static)
        out = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
               for a, s in zip(start.out_avals, start.out_shardings_jax(placement.mesh))]
        state = jax.tree.unflatten(start.out_tree, out)
        exported = {"start": start,
                    "generate": _export(PROGRAMS["generate"][tokens])(*prompt, plan=batch.plan, **static),
                    "advance": _export(PROGRAMS["advance"])(params, state, request, **static)}
        inputs = {"start": prompt, "generate": prompt, "advance": (params, state, request)}
        for name, program in exported.items():
            data = program.serialize()
            (directory / bucket.file(name)).write_bytes(data)
            programs[bucket.file(name)] = {"program": name, "bucket": dataclasses.asdict(bucket),
                                           "inputs": _avals(program.in_avals), "outputs": _avals(program.out_avals)}
            if precompile:
                options = program_options(name, bucket)
                path = _executable_path(directory, bucket.file(name), hashlib.sha256(data).hexdigest(),
                                        placement.mesh, options)
                Executable(directory / bucket.file(name), name, path, placement.mesh, options, program
                           ).compile(inputs[name])
    return {**environment(), "format": FORMAT, "mesh_shape": dict(placement.mesh.shape), "max_length": max_length,
            "buckets": [dataclasses.asdict(b) for b in wanted], "programs": programs}


def _export(fn: Any) -> Any:
    """`jax.export.export` of `fn`, allowing the decode kernel's custom call (`matvec`): it is registered in
    every process that loads the programs, which `environment` ties them to."""
    return export.export(fn, disabled_checks=[export.DisabledSafetyCheck.custom_call(matvec.TARGET)])


def environment() -> dict[str, str]:
    """What the exported programs are tied to: a different value anywhere means tracing instead. Besides jax
    and the platform, the source of the hdex_jax modules the programs are traced from (programs exported by
    another version of them could compute something else) and the decode kernel they call, if any."""
    import jaxlib

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "platform": jax.default_backend(),
            "machine": platform.machine(), "hdex_jax_code": _code_hash(), "matvec_kernel": matvec.kernel() or "none"}


@functools.cache
def _code_hash() -> str:
    """The hash of every source file of the package, the kernel's included. A list of only the modules the
    programs are traced from would go stale as soon as one of them imports another that the list lacks; hashing
    them all never misses one, costs about 3 ms, and at worst exports the programs again after a change that
    did not touch them."""
    package = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(p for p in package.rglob("*") if p.suffix in (".py", ".cc")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


_said: set[str] = set()


def _notice_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        print(f"[hdex] {message}", flush=True)


def program_options(program: str, bucket: Bucket) -> dict[str, bool | str]:
    """The XLA options of one exported program: its prompt bucket's for "start" and "generate", decode's for
    "advance" (`model.compiler_options`), as the traced programs get."""
    return compiler_options(0 if program == "advance" else bucket.prompt)


def _executable_path(directory: Path, file: str, program_sha256: str, mesh: Mesh, options: dict[str, Any]
                     ) -> Path:
    """Where the executable of the exported program `file` of `directory` (inst/lpu<N>/ or its scratch copy) is
    kept: named by what it was compiled from and for, so a changed program, jax, device set or XLA_FLAGS never
    loads an executable compiled for something else. (XLA itself refuses one built for another CPU.)"""
    what = [program_sha256, *environment().values(), repr(sorted(options.items())),
            os.environ.get("XLA_FLAGS", ""), ",".join(str(d.id) for d in mesh.devices.flat)]
    key = hashlib.sha256("\n".join(what).encode()).hexdigest()[:16]
    return xla_cache_dir(directory) / f"lpu{mesh.devices.size}-{Path(file).stem}-{key}.xla"


class Executable:
    """The exported program in the file `program` run as the XLA executable kept at `path`: loaded from there
    when it is whole and was compiled for this machine, else compiled (with `_advance` donating the state, as
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
            _notice_once(f"{self.path} is damaged; compiling the program again")
            return
        serialized, in_tree, out_tree = pickle.loads(payload)
        try:
            executable = serialize_executable.deserialize_and_load(serialized, in_tree, out_tree,
                                                                   execution_devices=list(self.mesh.devices.flat))
        except Exception as error:  # compiled for another CPU or XLA: say so and compile for this one
            _notice_once(f"{self.path} does not load here ({str(error).splitlines()[0][:200]}); compiling the "
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


class Programs:
    """The exported programs of one `inst/lpu<N>/` directory, each run as an `Executable`."""

    def __init__(self, directory: Path, manifest: dict[str, Any], mesh: Mesh):
        self.directory, self.mesh = directory, mesh
        self._programs = {name: record["program"] for name, record in manifest["programs"].items()}
        self._options = {name: program_options(record["program"], Bucket(**record["bucket"]))
                         for name, record in manifest["programs"].items()}
        self._paths = {name: _executable_path(directory, name, manifest["files"][name]["sha256"], mesh,
                                              self._options[name]) for name in manifest["programs"]}
        self._executables: dict[str, Executable] = {}

    def get(self, program: str, batch: Batch) -> Executable | None:
        """The exported `program` ("start", "generate" or "advance") for `batch`'s shapes, or None if the compile
        did not export that bucket."""
        name = bucket_of(batch).file(program)
        return self._executable(name) if name in self._programs else None

    def _executable(self, name: str) -> Executable:
        if name not in self._executables:
            self._executables[name] = Executable(self.directory / name, self._programs[name], self._paths[name],
                                                 self.mesh, self._options[name])
        return self._executables[name]

    def prefetch(self) -> None:
        """Start loading, in the background, the stored executable this machine used last, if any: most runs
        repeat the last one's shapes (a CLI called again, a notebook run again)."""
        stored = []
        for name, path in self._paths.items():
            with contextlib.suppress(OSError):
                stored.append((path.stat().st_mtime_ns, name))
        if stored:
            self._executable(max(stored)[1]).prefetch()


def load(directory: Path, mesh: Mesh, max_length: int, level: str, remedy: str) -> Programs | None:
    """The programs of a complete, verified `inst/lpu<N>/` for `mesh`, matching this process's jax and platform;
    None (tracing) when there is none or they were exported for another environment, said once. A corrupted
    file raises `artifacts.ArtifactError`."""
    manifest = artifacts.read_manifest(directory)
    if manifest is None:
        return None
    artifacts.verify(directory, manifest, level, remedy)
    num_device = mesh.devices.size
    here = environment()
    recorded = {key: manifest.get(key) for key in here}
    if recorded != here:
        changed = ", ".join(f"{key} {recorded[key]} -> {here[key]}" for key in here if recorded[key] != here[key])
        if os.environ.get("HDEX_MATVEC") == "0" and [k for k in here if recorded[k] != here[k]] == ["matvec_kernel"]:
            # The user turned the kernel off for this process: the programs are right as they are.
            _notice_once("HDEX_MATVEC=0: tracing the programs with XLA's matrix products instead of loading the "
                         "exported ones, which call the decode kernel (same tokens, slower start-up)")
        else:
            _notice_once(f"{directory} was exported by another environment ({changed}); tracing the programs "
                         f"instead (same tokens, slower start-up); {remedy} to export them for this one")
        return None
    if manifest.get("format") != FORMAT or manifest.get("max_length") != max_length or \
            manifest.get("mesh_shape") != {"lpu": num_device}:
        _notice_once(f"{directory} does not match this hdex_jax, max_length {max_length} or {num_device} "
                     f"device(s); tracing the programs instead; {remedy}")
        return None
    return Programs(directory, manifest, mesh)


def reusable(manifest: dict[str, Any], max_length: int, wanted: list[Bucket]) -> bool:
    """Whether an existing inst/ serves a compile for `max_length` and the buckets `wanted` in this environment."""
    have = {Bucket(**b) for b in manifest.get("buckets", [])}
    return (all(manifest.get(key) == value for key, value in environment().items())
            and manifest.get("format") == FORMAT and manifest.get("max_length") == max_length
            and have >= set(wanted))


def forget_executables(inst_dir: Path, num_device: int) -> None:
    """Delete the stored executables of `num_device` devices' programs (before their programs are replaced)."""
    for path in xla_cache_dir(inst_dir).glob(f"lpu{num_device}-*.xla"):
        path.unlink(missing_ok=True)


def xla_cache_dir(inst_dir: Path) -> Path:
    """The stored executables of a model's programs and JAX's persistent compilation cache: `inst/xla_cache/`,
    shared by its device counts."""
    return inst_dir.parent / "xla_cache"


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
