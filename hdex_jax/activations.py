"""The MLP activations, declared once: the name `ModelConfig.activation` holds, the function the forward pass
applies, and the Hugging Face config names (`hidden_act`, `activation_function`) that mean it."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax


@dataclasses.dataclass(frozen=True)
class Activation:
    """One activation: what the forward pass computes, and the Hugging Face names converters map to it."""

    fn: Callable[[jax.Array], jax.Array]
    hf_names: tuple[str, ...]


# "gelu_new" and "gelu_pytorch_tanh" are both the tanh approximation of GELU.
ACTIVATIONS: dict[str, Activation] = {
    "silu": Activation(jax.nn.silu, ("silu", "swish")),
    "relu": Activation(jax.nn.relu, ("relu",)),
    "gelu": Activation(functools.partial(jax.nn.gelu, approximate=False), ("gelu",)),
    "gelu_tanh": Activation(functools.partial(jax.nn.gelu, approximate=True), ("gelu_new", "gelu_pytorch_tanh")),
}
