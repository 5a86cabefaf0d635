"""Argument checks for every public entry point: one function per kind of value, each written once.

The API (`AutoCompiler.compile`, `from_pretrained`, `generate`, `generate_yield`, `hdex_jax.lpu.estimate`) and
the CLI call these before any work or allocation. Each check takes the name the caller knows the value by
(`"seed"`, `"device_map['lpu']"`, `"--num-device"`) and raises

- `TypeError` for a value of the wrong kind: bool is not an int, None is not a bool, a str is not a number;
- `ValueError` for a value of the right kind outside the accepted range, or NaN;

with a message naming the argument, the value given and what is accepted. Each returns the value as a plain
Python object (numpy scalars and 0-d arrays unwrapped), so callers use the result rather than the input.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

# Seeds are 64-bit: every integer in [0, SEED_LIMIT) is a distinct seed.
SEED_LIMIT = 2**64
# hdex_jax makes this many virtual CPU devices itself when the JAX backend has not started
# (`hdex_jax.runtime.setup`), so device counts up to it never need the backend.
VIRTUAL_CPU_DEVICES = 8
# Values are quoted in messages up to this many characters, so a huge list does not flood the terminal.
_QUOTE_LIMIT = 80


def quote(value: Any) -> str:
    """`repr(value)`, shortened for messages."""
    text = repr(value)
    return text if len(text) <= _QUOTE_LIMIT else text[: _QUOTE_LIMIT - 3] + "..."


def _given(value: Any) -> str:
    """How a message shows a value of the wrong type: its repr and its type name."""
    return f"{quote(value)} ({type(value).__name__})"


def _unwrap(value: Any) -> Any:
    """A 0-d numpy or JAX array as its Python scalar; anything else unchanged."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item") and not isinstance(value, np.generic):
        return value.item()
    return value


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def _number(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _bounds(minimum: float | None, maximum: float | None, min_inclusive: bool = True,
            max_inclusive: bool = True) -> str:
    """The accepted range in words: "from 1 to 8", ">= 0", "> 0 and <= 1", or "" for no bound."""
    if minimum is not None and maximum is not None and min_inclusive and max_inclusive:
        return f"from {_number(minimum)} to {_number(maximum)}"
    parts = []
    if minimum is not None:
        parts.append(f"{'>=' if min_inclusive else '>'} {_number(minimum)}")
    if maximum is not None:
        parts.append(f"{'<=' if max_inclusive else '<'} {_number(maximum)}")
    return " and ".join(parts)


def check_bool(name: str, value: Any) -> bool:
    """`value` if it is a bool (or numpy bool); None, ints and strings are a TypeError."""
    value = _unwrap(value)
    if not _is_bool(value):
        raise TypeError(f"{name} must be True or False, got {_given(value)}")
    return bool(value)


def check_int(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as an int if it is an integer (Python or numpy; not a bool, not a float) within the bounds."""
    value = _unwrap(value)
    if _is_bool(value) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {_given(value)}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an integer {_bounds(minimum, maximum)}, got {value}")
    return value


def check_float(name: str, value: Any, *, minimum: float | None = None, maximum: float | None = None,
                min_inclusive: bool = True, max_inclusive: bool = True) -> float:
    """`value` as a float if it is a real number (ints accepted; not a bool, not NaN) within the bounds.

    Infinity passes unless the bounds exclude it; `maximum=math.inf, max_inclusive=False` asks for a finite
    number.
    """
    value = _unwrap(value)
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {_given(value)}")
    finite = maximum == math.inf and not max_inclusive
    kind = "a finite number" if finite else "a number"
    accepted = f"{kind} {_bounds(minimum, None if finite else maximum, min_inclusive, max_inclusive)}".rstrip()
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        raise ValueError(f"{name} must be {accepted}, got {quote(value)}") from None
    too_low = minimum is not None and (number < minimum or (not min_inclusive and number == minimum))
    too_high = maximum is not None and (number > maximum or (not max_inclusive and number == maximum))
    if math.isnan(number) or too_low or too_high:
        raise ValueError(f"{name} must be {accepted}, got {number:g}")
    return number


def check_seed(name: str, value: Any) -> int:
    """A seed: any integer from 0 to 2**64 - 1, each a distinct seed; bool, float and others are errors."""
    return check_int(name, value, minimum=0, maximum=SEED_LIMIT - 1)


def per_row(name: str, value: Any, batch: int, check: Callable[[str, Any], T] | None = None) -> list[T]:
    """One checked value per row of a batch of `batch` rows.

    A scalar applies to every row; a list, tuple or 1-D array must have exactly one value per row, each
    checked under the name `name[i]`. Without `check`, values are only split into rows (for values checked
    later, together with the rest of their row).
    """
    if check is None:
        return per_row(name, value, batch, lambda _, v: v)
    if isinstance(value, (list, tuple)) or getattr(value, "ndim", 0) >= 1:
        values = list(value) if isinstance(value, (list, tuple)) else list(np.asarray(value))
        if getattr(value, "ndim", 1) != 1:
            raise ValueError(f"{name} must be one value or a 1-D list of one value per row, got an array of "
                             f"shape {tuple(value.shape)}")
        if len(values) != batch:
            raise ValueError(f"{name} has {len(values)} value(s) but the batch has {batch} row(s): give one value "
                             f"for every row, or a single value for all of them")
        return [check(f"{name}[{i}]", v) for i, v in enumerate(values)]
    return [check(name, value)] * batch


def check_streamer(value: Any, methods: Sequence[str] = ("put", "end")) -> Any:
    """`value` if it is None or has callable `methods` (a streamer such as `hdex_jax.transformers.TextStreamer`)."""
    missing = [m for m in methods if not callable(getattr(value, m, None))]
    if value is not None and missing:
        raise TypeError(f"streamer must be None or an object with {' and '.join(f'{m}()' for m in methods)} "
                        f"methods, such as hdex_jax.transformers.TextStreamer; got {_given(value)}, which has no "
                        f"{', '.join(missing)}")
    return value


def device_limit() -> int:
    """The most devices JAX can provide here: 8 virtual CPU devices or the real device count, whichever is larger.

    Starts the JAX backend to count the devices (it has to exist for them to be used anyway); callers that
    only need to accept counts up to 8 avoid that, see `check_num_device`.
    """
    import jax

    return max(VIRTUAL_CPU_DEVICES, jax.device_count())


def check_num_device(name: str, value: Any) -> int:
    """A device count: an integer from 1 to `device_limit()`.

    Counts up to 8 are accepted without starting the JAX backend, which hdex_jax can always provide as
    virtual CPU devices; only a larger count needs the backend to tell how many devices exist.
    """
    value = check_int(name, value, minimum=1)
    if value > VIRTUAL_CPU_DEVICES:
        limit = device_limit()
        if value > limit:
            raise ValueError(f"{name} must be an integer from 1 to {limit} (the devices JAX can provide on this "
                             f"host), got {value}")
    return value


def check_max_length(name: str, value: Any) -> int:
    """A max_length: an integer >= 2 (room for one prompt token and one new token)."""
    return check_int(name, value, minimum=2)


def check_max_new_tokens(name: str, value: Any) -> int:
    """A token budget: an integer >= 1."""
    return check_int(name, value, minimum=1)


def check_temperature(name: str, value: Any) -> float:
    """A sampling temperature: a finite number > 0 (greedy decoding is `do_sample=False`, not temperature 0)."""
    return check_float(name, value, minimum=0.0, min_inclusive=False, maximum=math.inf, max_inclusive=False)


def check_top_p(name: str, value: Any) -> float:
    """A top-p: a number in [0, 1]; 1 switches the filter off, 0 keeps only the most likely token."""
    return check_float(name, value, minimum=0.0, maximum=1.0)


def check_top_k(name: str, value: Any) -> int:
    """A top-k: an integer >= 0; 0 switches the filter off."""
    return check_int(name, value, minimum=0)


def check_repetition_penalty(name: str, value: Any) -> float:
    """A repetition penalty: a finite number > 0; 1 switches it off."""
    return check_float(name, value, minimum=0.0, min_inclusive=False, maximum=math.inf, max_inclusive=False)


def check_token_id(name: str, value: Any, vocab_size: int) -> int:
    """A token id: an integer in [0, vocab_size). A str is a TypeError that says to encode it first."""
    if isinstance(value, str):
        raise TypeError(f"{name} must be a token id (an integer), got the str {quote(value)}: encode text with the "
                        f"model's tokenizer first (model.tokenizer.encode(text))")
    return check_int(name, value, minimum=0, maximum=vocab_size - 1)


def check_token_ids(name: str, value: Any, vocab_size: int) -> list[int]:
    """A prompt as token ids: a non-empty list, tuple or 1-D array of ids in [0, vocab_size).

    A str (for example one row of a batch given as text) is a TypeError that says it needs the tokenizer.
    """
    if isinstance(value, str):
        raise TypeError(f"{name} is the str {quote(value)}, but here a prompt must be token ids: a batch of text "
                        f"needs a tokenizer, e.g. [model.tokenizer.encode(text) for text in texts]")
    if not isinstance(value, (list, tuple)) and getattr(value, "ndim", None) != 1:
        raise TypeError(f"{name} must be a list of token ids, got {_given(value)}")
    if len(value) == 0:
        raise ValueError(f"{name} is empty: every prompt needs at least one token")
    return [check_token_id(f"{name}[{i}]", t, vocab_size) for i, t in enumerate(value)]


def check_model_id(name: str, value: Any) -> str:
    """A model id or path: a non-empty str or os.PathLike, returned as a str."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str (a Hub id 'org/name', a local directory or a .gguf file), got "
                        f"{_given(value)}")
    if not value.strip():
        raise ValueError(f"{name} is empty: give a Hub id 'org/name', a local directory or a .gguf file")
    return value


def check_token(name: str, value: Any) -> str | bool | None:
    """A Hugging Face token: a str, True (use the saved token), False or None (no token)."""
    value = _unwrap(value)
    if value is not None and not isinstance(value, str) and not _is_bool(value):
        raise TypeError(f"{name} must be a str, a bool or None, got {_given(value)}")
    return value
