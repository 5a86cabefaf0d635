"""`hdex_jax.validation` on its own: what each check accepts, what it returns, and what its errors say."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from hdex_jax import validation as v

# ------------------------------------------------------------------------------------------------ accepted

ACCEPTED = [
    (v.check_bool, True, True),
    (v.check_bool, np.bool_(False), False),
    (v.check_bool, np.array(True), True),
    (v.check_int, 3, 3),
    (v.check_int, np.int64(3), 3),
    (v.check_int, np.uint64(2**64 - 1), 2**64 - 1),
    (v.check_int, jnp.int32(7), 7),
    (v.check_float, 1, 1.0),
    (v.check_float, 0.5, 0.5),
    (v.check_float, np.float32(0.25), 0.25),
    (v.check_float, jnp.float32(0.25), 0.25),
    (v.check_float, math.inf, math.inf),
    (v.check_seed, 0, 0),
    (v.check_seed, 2**32, 2**32),
    (v.check_seed, 2**64 - 1, 2**64 - 1),
    (v.check_seed, np.uint64(2**64 - 1), 2**64 - 1),
    (v.check_max_length, 2, 2),
    (v.check_max_new_tokens, 1, 1),
    (v.check_temperature, 1e-6, 1e-6),
    (v.check_top_p, 0, 0.0),
    (v.check_top_p, 1, 1.0),
    (v.check_top_k, 0, 0),
    (v.check_repetition_penalty, 1.2, 1.2),
    (v.check_num_device, 1, 1),
    (v.check_num_device, 8, 8),
    (v.check_model_id, Path("/some/dir"), "/some/dir"),
    (v.check_model_id, "org/name", "org/name"),
    (v.check_token, None, None),
    (v.check_token, True, True),
    (v.check_token, "hf_abc", "hf_abc"),
]


@pytest.mark.parametrize("check, value, expected", ACCEPTED, ids=[f"{c.__name__}-{x!r}" for c, x, _ in ACCEPTED])
def test_accepts_and_returns_plain_python(check, value, expected):
    result = check("arg", value)
    assert result == expected and type(result) is type(expected)


# ------------------------------------------------------------------------------------------------ rejected

REJECTED = [
    # bool is not an int, None is not a bool, a str is not a number
    (v.check_bool, None, TypeError, "arg must be True or False, got None (NoneType)"),
    (v.check_bool, "yes", TypeError, "got 'yes' (str)"),
    (v.check_bool, 1, TypeError, "got 1 (int)"),
    (v.check_int, True, TypeError, "arg must be an integer, got True (bool)"),
    (v.check_int, 1.0, TypeError, "got 1.0 (float)"),
    (v.check_int, "3", TypeError, "got '3' (str)"),
    (v.check_int, None, TypeError, "got None"),
    (v.check_float, True, TypeError, "arg must be a number, got True (bool)"),
    (v.check_float, "0.5", TypeError, "got '0.5' (str)"),
    (v.check_float, None, TypeError, "got None"),
    (v.check_float, math.nan, ValueError, "arg must be a number, got nan"),
    (v.check_seed, -1, ValueError, "arg must be an integer from 0 to 18446744073709551615, got -1"),
    (v.check_seed, 2**64, ValueError, "got 18446744073709551616"),
    (v.check_seed, 2**70, ValueError, "from 0 to 18446744073709551615"),
    (v.check_seed, 1.0, TypeError, "arg must be an integer, got 1.0 (float)"),
    (v.check_seed, True, TypeError, "got True (bool)"),
    (v.check_seed, "0", TypeError, "got '0' (str)"),
    (v.check_max_length, 1, ValueError, "arg must be an integer >= 2, got 1"),
    (v.check_max_new_tokens, 0, ValueError, "arg must be an integer >= 1, got 0"),
    (v.check_max_new_tokens, True, TypeError, "got True (bool)"),
    (v.check_temperature, 0, ValueError, "arg must be a finite number > 0, got 0"),
    (v.check_temperature, math.inf, ValueError, "got inf"),
    (v.check_temperature, math.nan, ValueError, "got nan"),
    (v.check_top_p, 1.5, ValueError, "arg must be a number from 0 to 1, got 1.5"),
    (v.check_top_p, -0.0001, ValueError, "from 0 to 1"),
    (v.check_top_k, -1, ValueError, "arg must be an integer >= 0, got -1"),
    (v.check_top_k, 1.0, TypeError, "got 1.0 (float)"),
    (v.check_repetition_penalty, 0, ValueError, "arg must be a finite number > 0, got 0"),
    (v.check_num_device, 0, ValueError, "arg must be an integer >= 1, got 0"),
    (v.check_num_device, 9, ValueError, "arg must be an integer from 1 to 8 (the devices JAX can provide"),
    (v.check_num_device, 10**6, ValueError, "got 1000000"),
    (v.check_num_device, True, TypeError, "got True (bool)"),
    (v.check_model_id, "", ValueError, "arg is empty"),
    (v.check_model_id, None, TypeError, "arg must be a str"),
    (v.check_model_id, 3, TypeError, "got 3 (int)"),
    (v.check_token, 1, TypeError, "arg must be a str, a bool or None, got 1 (int)"),
]


@pytest.mark.parametrize("check, value, error, message", REJECTED,
                         ids=[f"{c.__name__}-{x!r}" for c, x, _, _ in REJECTED])
def test_rejects_naming_the_argument_the_value_and_the_range(check, value, error, message):
    with pytest.raises(error) as err:
        check("arg", value)
    assert message in str(err.value)


@pytest.mark.parametrize("kwargs, value, message", [
    (dict(minimum=0.0, min_inclusive=False), 0.0, "arg must be a number > 0, got 0"),
    (dict(minimum=0.0, maximum=1.0, max_inclusive=False), 1.0, "arg must be a number >= 0 and < 1, got 1"),
    (dict(maximum=2.0), 3, "arg must be a number <= 2, got 3"),
    (dict(minimum=0.0), -(10**400), "arg must be a number >= 0, got -1000000"),  # too large for a float
])
def test_float_bounds(kwargs, value, message):
    with pytest.raises(ValueError) as err:
        v.check_float("arg", value, **kwargs)
    assert message in str(err.value)


def test_long_values_are_shortened_in_messages():
    with pytest.raises(TypeError) as err:
        v.check_int("arg", "x" * 1000)
    assert len(str(err.value)) < 150 and "..." in str(err.value)


# ------------------------------------------------------------------------------------------------- per_row

@pytest.mark.parametrize("value, expected", [
    (5, [5, 5, 5]),
    ([1, 2, 3], [1, 2, 3]),
    ((1, 2, 3), [1, 2, 3]),
    (np.array([1, 2, 3], np.uint64), [1, 2, 3]),
    (jnp.array([1, 2, 3]), [1, 2, 3]),
    (np.int64(4), [4, 4, 4]),
])
def test_per_row_gives_one_checked_value_per_row(value, expected):
    result = v.per_row("seed", value, 3, v.check_seed)
    assert result == expected and all(type(x) is int for x in result)


@pytest.mark.parametrize("value, error, message", [
    ([1, 2], ValueError, "seed has 2 value(s) but the batch has 3 row(s)"),
    ([], ValueError, "seed has 0 value(s)"),
    (np.zeros((3, 1), np.int64), ValueError, "seed must be one value or a 1-D list of one value per row, got an "
                                               "array of shape (3, 1)"),
    ([1, -2, 3], ValueError, "seed[1] must be an integer from 0 to"),
    ([1, 2, "3"], TypeError, "seed[2] must be an integer, got '3' (str)"),
    ("3", TypeError, "seed must be an integer, got '3' (str)"),
])
def test_per_row_errors_name_the_row(value, error, message):
    with pytest.raises(error) as err:
        v.per_row("seed", value, 3, v.check_seed)
    assert message in str(err.value)


# ------------------------------------------------------------------------------------------------ streamer

class _Streamer:
    def put(self, value):
        pass

    def end(self):
        pass


class _NotCallable:
    put = end = None


def test_streamer():
    streamer = _Streamer()
    assert v.check_streamer(None) is None and v.check_streamer(streamer) is streamer
    for bad in (object(), "yes", _NotCallable()):
        with pytest.raises(TypeError, match=r"streamer must be None or an object with put\(\) and end\(\)"):
            v.check_streamer(bad)
    with pytest.raises(TypeError, match="which has no take_pieces"):
        v.check_streamer(streamer, methods=("put", "end", "take_pieces"))


# ------------------------------------------------------------------------------------------------ token ids

def test_token_ids():
    assert v.check_token_ids("inputs", np.array([1, 2]), 10) == [1, 2]
    cases = [("abc", TypeError, "needs a tokenizer"), ([], ValueError, "inputs is empty"),
             ([1, 10], ValueError, r"inputs\[1\] must be an integer from 0 to 9, got 10"),
             ([1, True], TypeError, r"inputs\[1\] must be an integer, got True"),
             ([1, "a"], TypeError, r"inputs\[1\] must be a token id .* encode text"), (5, TypeError, "list of token ids")]
    for value, error, message in cases:
        with pytest.raises(error, match=message):
            v.check_token_ids("inputs", value, 10)


def test_device_counts_up_to_eight_do_not_start_the_backend():
    """Starting JAX's backend before hdex_jax asks for virtual devices would leave one CPU device."""
    script = ("from jax._src import xla_bridge\nfrom hdex_jax import validation\n"
              "assert validation.check_num_device('n', 8) == 8\n"
              "assert not xla_bridge.backends_are_initialized()\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
