"""How the datapath's functions become XLA programs: the compiler options of each kind of program, the
power-of-two buckets that let lengths share a program, and the prompt pass and decode step jitted for direct use
(tests, scripts and notebooks; generation and scoring jit their own whole programs with the same options).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from hdex_jax import forward

# XLA options of every program that updates the cache. Region analysis lets copy insertion see that attention
# reads a layer's cache before its update, so the update happens in place: without it XLA CPU copies every
# layer's k and v twice per decode step (docs/performance.md). No YNNPACK fusions: XLA CPU builds each one's
# runtime on a program's first run (0.6 s of the first generate of SmolLM2 on 2 devices) and the attention
# products it took measured no faster per token than XLA's own dots. The fields are shared by all backends'
# options.
COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True, "xla_cpu_experimental_ynn_fusion_type": ""}
# Programs of a prompt pass of YNN_PROMPT_TOKENS or more (generation's and scoring's, through `JitByPromptTokens`;
# the test-only `prefill`) keep YNNPACK's fusions (XLA CPU's default): they take the prompt's matrix products up to
# 1.4x faster than XLA's own dots at 256-2048 tokens, which outweighs building their runtime on the first run
# (docs/performance.md, "The prompt pass"). Shorter prompt passes go without: the 0.6 s would cost more than they
# save, and YNNPACK sums in another order, a little further from transformers (SmolLM2's logits up to 1.4e-4 away
# at 25 tokens, where XLA's dots stay within 1e-4; docs/numerics.md).
PROMPT_PASS_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}
YNN_PROMPT_TOKENS = 256


def compiler_options(prompt_tokens: int) -> dict[str, bool | str]:
    """The XLA options of a program whose prompt pass covers `prompt_tokens` tokens (0: decode steps only)."""
    return PROMPT_PASS_OPTIONS if prompt_tokens >= YNN_PROMPT_TOKENS else COMPILER_OPTIONS


class JitByPromptTokens:
    """`fn` jitted with the XLA options of its prompt pass (`compiler_options`): `[tokens]` is the jitted function
    for a prompt pass of that many tokens. One rule for every program that holds a prompt pass (generation's and
    scoring's), so that a prompt of a given bucket is computed alike whichever asks for it."""

    def __init__(self, fn: Callable, **jit_kwargs: Any):
        self._fn, self._jit_kwargs, self._jitted = fn, jit_kwargs, {}

    def __getitem__(self, prompt_tokens: int) -> Callable:
        options = compiler_options(prompt_tokens)
        key = tuple(sorted(options.items()))
        if key not in self._jitted:
            self._jitted[key] = jax.jit(self._fn, compiler_options=options, **self._jit_kwargs)
        return self._jitted[key]


# The forward pass's prompt pass and decode step jitted on their own, with the cache donated.
prefill = jax.jit(forward.prefill_fn, static_argnames=("cfg", "mesh"), donate_argnames="cache",
                  compiler_options=PROMPT_PASS_OPTIONS)
prefill.__doc__ = forward.prefill_fn.__doc__
decode_step = jax.jit(forward.decode_step_fn, static_argnames=("cfg", "mesh"), donate_argnames="cache",
                      compiler_options=COMPILER_OPTIONS)
decode_step.__doc__ = forward.decode_step_fn.__doc__


def bucket_length(length: int, minimum: int = 16) -> int:
    """Smallest power of two >= length (at least `minimum`): prompt shapes that share a bucket share a program."""
    return max(minimum, 1 << (max(length, 1) - 1).bit_length())
