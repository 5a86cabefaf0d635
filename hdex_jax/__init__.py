"""hdex_jax: a JAX functional emulator of HyperAccel's LPU and its HyperDex software stack."""

from hdex_jax.config import ModelConfig

__version__ = "0.1.0"
__all__ = ["ModelConfig", "__version__"]
