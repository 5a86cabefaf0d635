"""`setup`: what a process needs before hdex_jax runs a model, done by the entry points instead of by importing
hdex_jax, so that an import changes no JAX configuration, no environment variable and builds nothing.

The entry points call it: `AutoModelForCausalLM.from_pretrained`, `AutoCompiler.compile` (and so every `hdex`
command that loads or compiles a model) and `hdex_jax.distributed.initialize`. Code that traces hdex_jax's
functions itself (generation, the model's forward pass or `matvec` without a compiled model) calls it first, as
early as it can: the virtual devices can only be created before JAX's backend starts.
"""

from __future__ import annotations

import os

from hdex_jax import kernel_build, sharding


def setup() -> None:
    """Prepare this process to run models; later calls do nothing more:

    - 8 virtual CPU devices, if JAX's backend has not started and no device count was chosen
      (`sharding.provide_virtual_devices`), so every device count from 1 to 8 works later in the process;
    - transformers' advice quieted (`quiet_transformers`);
    - the decode kernel built (once per machine), loaded and registered (`kernel_build.register`), so the
      programs traced from now on call it.
    """
    quiet_transformers()
    sharding.provide_virtual_devices()
    kernel_build.register()


def quiet_transformers() -> None:
    """Set TRANSFORMERS_NO_ADVISORY_WARNINGS (unless the user set it) before hdex_jax imports transformers:
    without torch, importing transformers advises that "Models won't be available", which would only mislead,
    since hdex_jax's models run on JAX and use only transformers' tokenizers."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
