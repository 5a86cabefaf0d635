from hdex_jax.tools.compiler import AutoCompiler

__all__ = ["AutoCompiler"]
