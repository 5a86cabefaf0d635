"""hdex_jax: a JAX functional emulator of HyperAccel's LPU and its HyperDex software stack."""

from hdex_jax.config import ModelConfig
from hdex_jax.sharding import provide_virtual_devices

provide_virtual_devices()

__version__ = "0.1.0"
__all__ = ["ModelConfig", "__version__"]
