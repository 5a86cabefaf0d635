"""hdex_jax: a JAX functional emulator of HyperAccel's LPU and its HyperDex software stack."""

import os

# Without torch, importing transformers advises that "Models won't be available"; hdex_jax's models run on JAX
# and use only transformers' tokenizers, so that advice would only mislead. Set before transformers is imported.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from hdex_jax.config import ModelConfig  # noqa: E402  (after the environment above)
from hdex_jax.sharding import provide_virtual_devices  # noqa: E402

provide_virtual_devices()

__version__ = "0.1.0"
__all__ = ["ModelConfig", "__version__"]
