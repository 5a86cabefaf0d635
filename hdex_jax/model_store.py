"""`ModelStore`: one model's compiled artifacts, the one object the compiler writes through and
`from_pretrained` reads through.

A store is made from a model id once (`ModelStore.open`): the id is resolved (`hub.locate`) into where its
checkpoint comes from and its directory `$HDEX_HOME/hub/<org>/<name>/`, and everything after takes the store.
It holds the directory's layout (`ckpt/`, `param/lpu<N>/`, `inst/lpu<N>/`: `hdex_jax.artifacts`), its lock,
the manifests (each read once, and verified once before use), the answer to "is it compiled for N devices,
this max_length and this number format", and the restoring of weights and programs onto a mesh (`placement`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from hdex_jax import artifacts, executable_cache, exported_programs, formats, hub
from hdex_jax.config import ModelConfig
from hdex_jax.generation import Placement
from hdex_jax.layout import head_layout, padded_config
from hdex_jax.sharding import make_mesh, param_shardings

# HyperDex's default; a model with fewer positions is compiled for its positions, with a notice.
DEFAULT_MAX_LENGTH = 4096


def served_max_length(max_length: int, cfg: ModelConfig) -> int:
    """`max_length`, or the model's max_position_embeddings if it has fewer.

    The model has no positions past those, so a larger max_length could never be served; HyperDex's own example
    asks opt-1.3b (2048 positions) for 4096. Dynamic (NTK) rope scaling is what serves positions past them, so
    with it `max_length` is kept.
    """
    if max_length <= cfg.max_position_embeddings or dict(cfg.rope_scaling).get("rope_type") == "dynamic":
        return max_length
    return cfg.max_position_embeddings


class ModelStore:
    """The compiled artifacts of one model id; see the module's docstring."""

    def __init__(self, source: hub.ModelSource):
        self.source = source
        self._manifests: dict[Path, dict[str, Any] | None] = {}
        self._verified: set[tuple[Path, str]] = set()  # (directory, level) checked

    @classmethod
    def open(cls, model_id: str | os.PathLike, *, writable: bool = False, name: str = "model_id") -> ModelStore:
        """The store of `model_id`; `writable` checks that HDEX_HOME can be written (for a compile). Raises as
        `hub.locate` does, naming the argument `name`."""
        return cls(hub.locate(model_id, writable=writable, name=name))

    @property
    def model_id(self) -> str:
        return self.source.model_id

    @property
    def directory(self) -> Path:
        return self.source.directory

    @property
    def ckpt_dir(self) -> Path:
        return artifacts.ckpt_dir(self.directory)

    def param_dir(self, num_device: int) -> Path:
        return artifacts.param_dir(self.directory, num_device)

    def inst_dir(self, num_device: int) -> Path:
        return artifacts.inst_dir(self.directory, num_device)

    def lock(self, shared: bool = False) -> contextlib.AbstractContextManager[None]:
        """The model's lock: exclusive for a compile, shared for a load (`artifacts.lock`)."""
        return artifacts.lock(self.directory, shared)

    def remedy(self, num_device: int) -> str:
        """How to rebuild the artifacts on `num_device` devices, for error messages."""
        return (f"compile it again: AutoCompiler().compile({self.model_id!r}, num_device={num_device}, force=True), "
                f"or `hdex compile {self.model_id} --num-device {num_device} --force`")

    def cap_max_length(self, max_length: int, cfg: ModelConfig) -> int:
        """`served_max_length`, with a notice when it is less than `max_length`."""
        served = served_max_length(max_length, cfg)
        if served != max_length:
            print(f"[hdex] max_length {max_length} exceeds the {served} positions of {self.model_id} "
                  f"(max_position_embeddings); using max_length {served}", flush=True)
        return served

    # --------------------------------------------------------------------------------------------- manifests
    def manifest(self, directory: Path) -> dict[str, Any] | None:
        """The current manifest of an artifact directory (`artifacts.current_manifest`), read once."""
        if directory not in self._manifests:
            self._manifests[directory] = artifacts.current_manifest(directory)
        return self._manifests[directory]

    def forget(self) -> None:
        """Forget every manifest read: another store (a compile) may have written them since."""
        self._manifests.clear()
        self._verified.clear()

    def verified(self, directory: Path, num_device: int, level: str) -> dict[str, Any]:
        """The manifest of a complete artifact directory whose files match it (checked once per level); raises
        `artifacts.ArtifactError` naming the bad file."""
        manifest = self.manifest(directory)
        if manifest is None:
            raise artifacts.ArtifactError(
                f"{directory} is not a complete compiled artifact (no {artifacts.COMPLETE} manifest; another "
                f"process may have removed it); {self.remedy(num_device)}")
        if (directory, level) not in self._verified:
            artifacts.verify(directory, manifest, level, self.remedy(num_device))
            self._verified.add((directory, level))
        return manifest

    def config(self) -> ModelConfig:
        """The checkpoint's configuration, as converted into `ckpt/`."""
        return ModelConfig.load(self.ckpt_dir)

    # ------------------------------------------------------------------------------------- what is compiled
    def compiled_max_length(self, num_device: int) -> int | None:
        """The max_length the weights for `num_device` devices were compiled for, or None if they are not."""
        manifest = self.manifest(self.param_dir(num_device))
        return None if manifest is None or self.manifest(self.ckpt_dir) is None else manifest["max_length"]

    def why_compile(self, num_device: int, max_length: int | None, dtype: str | None) -> str | None:
        """Why `num_device` devices need a compile first (weights or programs missing, or compiled for another
        `max_length`; None: any), or None when they don't. A model compiled in another `dtype` (None: any) is
        refused, saying how to recompile."""
        manifest = self.manifest(self.param_dir(num_device))
        compiled = manifest.get("dtype", "float32") if manifest is not None else None
        if compiled is not None and dtype is not None and compiled != dtype:
            raise ValueError(
                f"{self.model_id} is compiled for {num_device} device(s) in {compiled}, not {dtype}; compile it "
                f"in {dtype} first: AutoCompiler().compile({self.model_id!r}, num_device={num_device}, "
                f"dtype={dtype!r}) (or hdex compile {self.model_id} --num-device {num_device} --dtype {dtype})")
        if self.compiled_max_length(num_device) is None:
            return f"{self.model_id} is not compiled for {num_device} device(s) yet (or by an older hdex_jax)"
        if self.manifest(self.inst_dir(num_device)) is None:
            return f"{self.model_id} has no compiled programs for {num_device} device(s) yet"
        if max_length is not None:
            wanted = self.cap_max_length(max_length, self.config())
            if manifest["max_length"] != wanted:
                return f"{self.model_id} is compiled for max_length {manifest['max_length']}, not {wanted}"
        return None

    # ------------------------------------------------------------------------------------------- loading
    def placement(self, num_device: int, first_device: int, level: str, programs: bool) -> Placement:
        """The weights compiled for `num_device` devices restored onto devices [first, first + num_device), with
        the exported programs of that device count when `programs`."""
        params_dir = self.param_dir(num_device)
        manifest = self.verified(params_dir, num_device, level)
        base = formats.from_manifest(self.config(), manifest)
        cfg = padded_config(base, num_device)
        found = (manifest.get("num_device"), manifest.get("num_heads"), manifest.get("num_kv_heads"))

        def wrong_layout(why: str) -> ValueError:
            return ValueError(f"{params_dir} holds a layout for (devices, heads, kv heads) = {found}, not the "
                              f"{(num_device, cfg.num_heads, cfg.num_kv_heads)} that {num_device} device(s) need "
                              f"({why}); delete it and compile again")

        if found != (num_device, cfg.num_heads, cfg.num_kv_heads):
            raise wrong_layout("its manifest says so")
        mesh = make_mesh(num_device, first_device)
        loaded = None
        inst_dir = self.inst_dir(num_device)
        if programs and self.manifest(inst_dir) is not None:
            loaded = exported_programs.load(inst_dir, self.verified(inst_dir, num_device, level), mesh,
                                            manifest["max_length"], self.remedy(num_device))
            if loaded is not None:
                executable_cache.use_xla_cache(executable_cache.xla_cache_dir(inst_dir))
                loaded.prefetch()  # while the weights are read
        params = artifacts.restore_params(params_dir, param_shardings(cfg, mesh), wrong_layout)
        return Placement(params, cfg, head_layout(base, num_device), mesh, base, loaded)
