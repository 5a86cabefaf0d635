"""Compiled artifacts of a model on disk: `ckpt/` (canonical checkpoint), `param/lpu<N>/` (device layout) and
`inst/lpu<N>/` (exported programs, `hdex_jax.exported_programs`).

Every artifact directory is built under a temporary name and renamed into place only when complete, with a
`COMPLETE` manifest written last. Loaders accept only directories that carry the manifest, so an interrupted
compile can never be mistaken for a finished one, and a recompile never destroys a good artifact before its
replacement is whole. The temporary names carry the host and process id (`.<name>.partial-<host>-<pid>`), so
the next compile can remove the ones a killed process left behind (`remove_stale`).

The manifest records every file's size and SHA-256 (`files`), and loaders check them (`verify`): by default
sizes, the whole hash of files up to 2 MiB and the hash of the first and last MiB of larger ones (what a
truncation, a rewritten header or a torn end changes); `verify="full"` hashes every byte. Compiles of one model
hold an exclusive lock on it (`lock`), loads a shared one, so two compiles never interleave and a load never
reads a directory while a compile replaces it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from hdex_jax import quant
from hdex_jax.atomic_files import atomic_write
from hdex_jax.config import ModelConfig
from hdex_jax.params import flatten, param_specs

COMPLETE = "COMPLETE"
WEIGHTS_FILE = "model.safetensors"
LOCK_FILE = ".lock"
# The cheap check hashes files up to twice this size whole, and the first and last EDGE bytes of larger ones.
EDGE = 1 << 20
VERIFY_LEVELS = ("cheap", "full")
# Scratch directories of `staged`: the artifact being built (partial) and the one being replaced (old).
_SCRATCH = re.compile(r"\..+\.(?:partial|old)-(?P<host>.+)-(?P<pid>\d+)")


def ckpt_dir(model_dir: Path) -> Path:
    return model_dir / "ckpt"


def param_dir(model_dir: Path, num_device: int) -> Path:
    return model_dir / "param" / f"lpu{num_device}"


def inst_dir(model_dir: Path, num_device: int) -> Path:
    return model_dir / "inst" / f"lpu{num_device}"


class ArtifactError(ValueError):
    """A compiled artifact file is missing, truncated or corrupted."""


def _sha256(path: Path, ranges: list[tuple[int, int]] | None = None) -> str:
    """SHA-256 of the whole file, or of the concatenated byte ranges (offset, length)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if ranges is None:
            while chunk := f.read(EDGE * 8):
                digest.update(chunk)
        else:
            for offset, length in ranges:
                f.seek(offset)
                digest.update(f.read(length))
    return digest.hexdigest()


def _edges(size: int) -> list[tuple[int, int]]:
    return [(0, EDGE), (size - EDGE, EDGE)]


def file_records(directory: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256[, edges_sha256]}} of every file under `directory` but the manifest."""
    records = {}
    for path in sorted(directory.rglob("*")):
        if not path.is_file() or path.name == COMPLETE or path.name.startswith(f".{COMPLETE}."):
            continue
        size = path.stat().st_size
        record: dict[str, Any] = {"size": size, "sha256": _sha256(path)}
        if size > 2 * EDGE:
            record["edges_sha256"] = _sha256(path, _edges(size))
        records[path.relative_to(directory).as_posix()] = record
    return records


def verify_level(verify: str | None) -> str:
    """The check to run: `verify`, else the environment's HDEX_VERIFY, else "cheap"."""
    level = verify if verify is not None else (os.environ.get("HDEX_VERIFY") or "cheap")
    if level not in VERIFY_LEVELS:
        source = "verify" if verify is not None else "HDEX_VERIFY"
        raise ValueError(f"{source} must be one of {VERIFY_LEVELS}, got {level!r}")
    return level


def verify(directory: Path, manifest: dict[str, Any], level: str, remedy: str) -> None:
    """Check the files of a complete artifact against its manifest; raise `ArtifactError` naming the first bad
    file and `remedy` (how to compile it again).

    "cheap": every file's size, the whole SHA-256 of files up to 2 MiB and that of the first and last MiB of
    larger ones; "full": the whole SHA-256 of every file.
    """
    records = manifest.get("files")
    if records is None:
        raise ArtifactError(f"{directory / COMPLETE} records no file hashes (written by an older hdex_jax); "
                            f"{remedy}")
    for name, record in records.items():
        path = directory / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ArtifactError(f"{path} is missing; {remedy}") from None
        if size != record["size"]:
            raise ArtifactError(f"{path} has {size} bytes, not the {record['size']} it was written with "
                                f"(truncated or replaced); {remedy}")
        if level == "cheap" and "edges_sha256" in record:
            found, expected = _sha256(path, _edges(size)), record["edges_sha256"]
        else:
            found, expected = _sha256(path), record["sha256"]
        if found != expected:
            raise ArtifactError(f"{path} is corrupted (its SHA-256 differs from the one recorded when it was "
                                f"written); {remedy}")


@contextlib.contextmanager
def lock(model_dir: Path, shared: bool = False) -> Iterator[None]:
    """Hold the model's lock: exclusive for a compile, shared for a load.

    fcntl locks belong to the open file, so the kernel releases them when a killed process's files close: a
    kill -9 never leaves the model locked. A reader that cannot create the lock file (a read-only HDEX_HOME,
    where no compile can run either) reads without it.
    """
    path = model_dir / LOCK_FILE
    try:
        if not shared:
            model_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        if not shared:
            raise
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a complete artifact directory, or None if it is missing or incomplete."""
    path = directory / COMPLETE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def current_manifest(directory: Path) -> dict[str, Any] | None:
    """`read_manifest`, but None also for a directory written by an hdex_jax before file hashes (and the
    safetensors weight layout) were recorded: a compile rewrites such a directory."""
    manifest = read_manifest(directory)
    return manifest if manifest is not None and "files" in manifest else None


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write `manifest` as the directory's COMPLETE file, atomically (a reader sees the old one or the new one)."""
    atomic_write(directory / COMPLETE, json.dumps(manifest, indent=2, sort_keys=True), fsync=True)


def _sync(directory: Path) -> None:
    """Flush every file under `directory` to disk, so the manifest renamed in after them never names data a
    power loss could still take back."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _scratch(final: Path, kind: str) -> Path:
    return final.parent / f".{final.name}.{kind}-{socket.gethostname()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def remove_stale(model_dir: Path) -> list[Path]:
    """Remove the scratch directories of `staged` in `model_dir` whose process is dead; return them.

    Only this host's are considered: a process id says nothing about another host sharing the directory.
    """
    host, removed = socket.gethostname(), []
    for parent in (model_dir, model_dir / "param", model_dir / "inst"):
        if not parent.is_dir():
            continue
        for entry in parent.iterdir():
            match = _SCRATCH.fullmatch(entry.name)
            if match and match["host"] == host and not _alive(int(match["pid"])):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


@contextlib.contextmanager
def staged(final: Path, manifest: dict[str, Any]) -> Iterator[Path]:
    """Yield a scratch directory; on success it gets `manifest`, with the hashes of the files written into it,
    and replaces `final` in one rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _scratch(final, "partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _sync(tmp)
        write_manifest(tmp, {**manifest, "files": file_records(tmp)})
        old = _scratch(final, "old")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tensors(flat: dict[str, Any]) -> dict[str, np.ndarray]:
    """Flat params -> safetensors' tensors: a QuantArray is one tensor per field ("<name>/values", ...)."""
    import jax

    tensors = {}
    for name, value in flat.items():
        if quant.is_quant(value):
            for field in ("values", "scale", "offset"):
                if getattr(value, field) is not None:
                    tensors[f"{name}/{field}"] = np.ascontiguousarray(getattr(value, field))
        else:
            tensors[name] = np.ascontiguousarray(jax.device_get(value))
    return tensors


def _from_tensors(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
    """`_tensors` read back, QuantArrays rebuilt from their fields by the declarations of `cfg`."""
    flat = dict(tensors)
    for name, spec in flatten(param_specs(cfg)).items():
        if spec.format is not None and f"{name}/values" in flat:
            fields = [flat.pop(f"{name}/{field}", None) for field in ("values", "scale", "offset")]
            flat[name] = quant.QuantArray(*fields, spec.format, spec.packed_axis)
    return flat


def write_ckpt(directory: Path, cfg: ModelConfig, flat: dict[str, Any]) -> None:
    """Canonical weights (safetensors, '/'-joined names; a quantized weight as its fields) and the config into
    `directory`."""
    from safetensors.numpy import save_file

    save_file(_tensors(flat), str(directory / WEIGHTS_FILE))
    cfg.save(directory)


def read_ckpt(directory: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """Load a complete `ckpt/` directory."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if read_manifest(directory) is None:
        raise FileNotFoundError(f"{directory} is not a complete hdex_jax checkpoint (no {COMPLETE} manifest); "
                                "run AutoCompiler().compile(...) again")
    cfg = ModelConfig.load(directory)
    try:
        flat = load_file(str(directory / WEIGHTS_FILE))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{directory / WEIGHTS_FILE} is unreadable ({err}); delete {directory} and compile "
                         "again") from err
    return cfg, _from_tensors(flat, cfg)


def _leaf_names(tree: Any) -> Any:
    """The pytree of '/'-joined paths of `tree`'s leaves ("layers/0/attn/qkv/w"): the tensor names of the file."""
    import jax

    return jax.tree_util.tree_map_with_path(
        lambda path, _: jax.tree_util.keystr(path, simple=True, separator="/"), tree)


def save_params(directory: Path, params: Any) -> None:
    """Write a param pytree (host arrays, in the form the forward pass reads) as `directory/model.safetensors`,
    one tensor per leaf under its '/'-joined path."""
    import jax
    from safetensors.numpy import save_file

    names = jax.tree.leaves(_leaf_names(params))
    save_file({name: np.ascontiguousarray(value) for name, value in zip(names, jax.tree.leaves(params))},
              str(directory / WEIGHTS_FILE))


def restore_params(directory: Path, shardings: Any, on_error: Callable[[str], Exception]) -> Any:
    """Read the params of `save_params` straight onto their devices: `shardings` is the pytree of the
    NamedShardings the forward pass reads (`sharding.param_shardings`). Each device (in every process) reads
    only its own shard from the file. A file whose tensors do not match `shardings` raises `on_error(why)`."""
    import jax
    from safetensors import safe_open

    names = _leaf_names(shardings)
    with safe_open(str(directory / WEIGHTS_FILE), framework="numpy") as f:
        stored, wanted = set(f.keys()), set(jax.tree.leaves(names))
        if stored != wanted:
            raise on_error(f"it holds tensors {sorted(stored - wanted)[:3]} and lacks {sorted(wanted - stored)[:3]}")

        def read(name: str, sharding: Any) -> jax.Array:
            tensor = f.get_slice(name)
            return jax.make_array_from_callback(tuple(tensor.get_shape()), sharding, lambda index: tensor[index])

        return jax.tree.map(read, names, shardings)
