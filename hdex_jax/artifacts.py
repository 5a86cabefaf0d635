"""Compiled artifacts of a model on disk: `ckpt/` (canonical checkpoint) and `param/lpu<N>/` (device layout).

Every artifact directory is built under a temporary name and renamed into place only when complete, with a
`COMPLETE` manifest written last. Loaders accept only directories that carry the manifest, so an interrupted
compile can never be mistaken for a finished one, and a recompile never destroys a good artifact before its
replacement is whole. The temporary names carry the host and process id (`.<name>.partial-<host>-<pid>`), so
the next compile can remove the ones a killed process left behind (`remove_stale`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from hdex_jax.config import ModelConfig

COMPLETE = "COMPLETE"
WEIGHTS_FILE = "model.safetensors"
# Scratch directories of `staged`: the artifact being built (partial) and the one being replaced (old).
_SCRATCH = re.compile(r"\..+\.(?:partial|old)-(?P<host>.+)-(?P<pid>\d+)")


def ckpt_dir(model_dir: Path) -> Path:
    return model_dir / "ckpt"


def param_dir(model_dir: Path, num_device: int) -> Path:
    return model_dir / "param" / f"lpu{num_device}"


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a complete artifact directory, or None if it is missing or incomplete."""
    path = directory / COMPLETE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    tmp = directory / f".{COMPLETE}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, directory / COMPLETE)


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
    for parent in (model_dir, model_dir / "param"):
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
    """Yield a scratch directory; on success it gets `manifest` and replaces `final` in one rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _scratch(final, "partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        write_manifest(tmp, manifest)
        old = _scratch(final, "old")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_ckpt(directory: Path, cfg: ModelConfig, flat: dict[str, np.ndarray]) -> None:
    """Canonical weights (safetensors, '/'-joined names) and the config into `directory`."""
    from safetensors.numpy import save_file

    save_file({name: np.ascontiguousarray(value) for name, value in flat.items()}, str(directory / WEIGHTS_FILE))
    cfg.save(directory)


def read_ckpt(directory: Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
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
    return cfg, flat


def save_params(directory: Path, params: Any) -> None:
    """Write a param pytree with orbax into `directory/state` (the directory must exist, `state` must not)."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((directory / "state").absolute(), params)
    checkpointer.wait_until_finished()


def restore_params(directory: Path, target: Any) -> Any:
    """Restore a param pytree written by `save_params`; `target` holds jax.ShapeDtypeStruct leaves with shardings,
    so each device receives only its own shard."""
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore((directory / "state").absolute(), target)
