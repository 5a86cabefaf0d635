"""`inst/lpu<N>/`: the compiled programs of a model, so a fresh process runs them without tracing its Python.

Phase 4 of the compile exports, with `jax.export`, the three programs `generate` runs (`generation.PROGRAMS`:
"generate", a whole generation, prefill to last token; "start", prefill and the first token, and "advance", one
decode step, for streaming) for the device count's mesh and each bucket of the compile (`buckets`), and writes them
with a manifest: jax and jaxlib versions, platform, mesh shape, buckets, each program's input and output shapes
and dtypes, and (through `artifacts.staged`) every file's hash. `load` reads them back as `Programs`; a call
whose shapes fall outside the exported buckets, a hybrid prefill mesh, or a jax version or platform other than
the compile's, traces as before (the last with a notice, once). Exported programs are the same computation as
the traced ones, so the tokens are the same either way.

XLA still compiles an exported program for the machine; `Programs` runs each through an
`executable_cache.Executable`, which keeps the result beside the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import platform
from pathlib import Path
from typing import Any

import jax
import jaxlib
import numpy as np
from jax import export
from jax.sharding import Mesh

from hdex_jax import kernel_build
from hdex_jax.executable_cache import Executable, executable_path, notice_once
from hdex_jax.generation import PROGRAMS, Batch, Placement, prepare_batch
from hdex_jax.jitting import compiler_options

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
    and stores its executable in `executable_cache.xla_cache_dir(directory)`, so even the first run after the
    compile skips XLA; `directory` is then the final `inst/lpu<N>/` path or a scratch directory beside it."""
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
    """`jax.export.export` of `fn`, allowing the decode kernel's custom call (`kernel_build`): it is registered
    in every process that loads the programs, which `environment` ties them to."""
    return export.export(fn, disabled_checks=[export.DisabledSafetyCheck.custom_call(kernel_build.TARGET)])


def environment() -> dict[str, str]:
    """What the exported programs are tied to: a different value anywhere means tracing instead. Besides jax
    and the platform, the source of hdex_jax (programs exported by another version of it could compute
    something else) and the decode kernel they call, if any (registered by `hdex_jax.runtime.setup`)."""
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "platform": jax.default_backend(),
            "machine": platform.machine(), "hdex_jax_code": _code_hash(),
            "matvec_kernel": kernel_build.registered() or "none"}


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


def program_options(program: str, bucket: Bucket) -> dict[str, bool | str]:
    """The XLA options of one exported program: its prompt bucket's for "start" and "generate", decode's for
    "advance" (`jitting.compiler_options`), as the traced programs get."""
    return compiler_options(0 if program == "advance" else bucket.prompt)


def _executable_path(directory: Path, file: str, program_sha256: str, mesh: Mesh, options: dict[str, Any]
                     ) -> Path:
    """Where the executable of the exported program `file` of `directory` is kept, compiled from its bytes in
    this environment."""
    return executable_path(directory, file, [program_sha256, *environment().values()], mesh, options)


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


def load(directory: Path, manifest: dict[str, Any], mesh: Mesh, max_length: int, remedy: str) -> Programs | None:
    """The programs of a complete `inst/lpu<N>/` whose files match `manifest` (`ModelStore.verified`), for `mesh`,
    matching this process's jax and platform; None (tracing) when they were exported for another environment or
    another max_length or mesh, said once with `remedy`."""
    num_device = mesh.devices.size
    here = environment()
    recorded = {key: manifest.get(key) for key in here}
    if recorded != here:
        changed = ", ".join(f"{key} {recorded[key]} -> {here[key]}" for key in here if recorded[key] != here[key])
        if os.environ.get("HDEX_MATVEC") == "0" and [k for k in here if recorded[k] != here[k]] == ["matvec_kernel"]:
            # The user turned the kernel off for this process: the programs are right as they are.
            notice_once("HDEX_MATVEC=0: tracing the programs with XLA's matrix products instead of loading the "
                        "exported ones, which call the decode kernel (same tokens, slower start-up)")
        else:
            notice_once(f"{directory} was exported by another environment ({changed}); tracing the programs "
                        f"instead (same tokens, slower start-up); {remedy} to export them for this one")
        return None
    if manifest.get("format") != FORMAT or manifest.get("max_length") != max_length or \
            manifest.get("mesh_shape") != {"lpu": num_device}:
        notice_once(f"{directory} does not match this hdex_jax, max_length {max_length} or {num_device} "
                    f"device(s); tracing the programs instead; {remedy}")
        return None
    return Programs(directory, manifest, mesh)


def reusable(manifest: dict[str, Any], max_length: int, wanted: list[Bucket]) -> bool:
    """Whether an existing inst/ serves a compile for `max_length` and the buckets `wanted` in this environment."""
    have = {Bucket(**b) for b in manifest.get("buckets", [])}
    return (all(manifest.get(key) == value for key, value in environment().items())
            and manifest.get("format") == FORMAT and manifest.get("max_length") == max_length
            and have >= set(wanted))


