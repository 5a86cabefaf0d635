"""hdex_jax: a JAX functional emulator of HyperAccel's LPU and its HyperDex software stack.

Importing it changes no configuration; `hdex_jax.runtime.setup` prepares a process to run models, and the entry
points (`from_pretrained`, `AutoCompiler.compile`, `hdex`) call it.
"""

from hdex_jax.config import ModelConfig

__version__ = "0.1.0"
__all__ = ["ModelConfig", "__version__"]
