"""The bad-input sweep (issue 13): every bad input through the Python API and the `hdex` CLI is a clear error
naming the argument, or a documented behaviour. No crash, no silent result, no foreign traceback, no message
about something the user did not pass.

Each API case asserts the exception type (TypeError for a value of the wrong kind, ValueError for a value out
of range, FileNotFoundError for a missing local path) and a message fragment naming the argument. Each CLI
case asserts exit status 2, one `hdex: error:` line naming the flag, and no traceback. Cases that once
exhausted the machine (`num_device=10**6`) run in a subprocess with a 4 GB address-space limit and a timeout.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hdex_jax import artifacts, hub
from hdex_jax.cli import main
from hdex_jax.config import ModelConfig
from hdex_jax.lpu import estimate
from hdex_jax.tools import AutoCompiler
from hdex_jax.transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer
from tests.helpers_tiny import save_tiny_checkpoint, tiny_hf_config, write_tiny_gguf

MAX_LENGTH = 64
POSITIONS = tiny_hf_config("llama").max_position_embeddings  # 128
PROMPT = [3, 17, 42, 9, 5]
MEMORY_LIMIT = 4 << 30  # bytes of address space for the subprocess cases
SUBPROCESS_TIMEOUT = 300


# --------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return str(save_tiny_checkpoint("llama", tmp_path_factory.mktemp("ckpt") / "tiny-llama"))


@pytest.fixture(scope="module")
def model(home, checkpoint):
    AutoCompiler().compile(checkpoint, num_device=1, max_length=MAX_LENGTH)
    return AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"lpu": 1})


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    """Tiny checkpoints whose final norm holds a NaN or an infinity, by kind."""

    def make(kind: str) -> str:
        directory = save_tiny_checkpoint("llama", tmp_path_factory.mktemp(f"poisoned-{kind}") / f"tiny-{kind}")
        weights = load_file(directory / "model.safetensors")
        weights["model.norm.weight"][3] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}[kind]
        save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
        return str(directory)

    return make


def _run(argv: list[str], *, limit_memory: bool = False) -> subprocess.CompletedProcess:
    """`python argv` in a fresh process (same environment, so the module's HDEX_HOME), optionally with its address
    space limited so that a runaway allocation fails instead of taking the machine down.

    The limit is set by the child itself before it imports anything (a preexec_fn would fork this
    multithreaded JAX process); `argv` is then run as `python` would run it.
    """
    if limit_memory:
        argv = ["-c", "import resource, runpy, sys\n"
                      f"resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT}, {MEMORY_LIMIT}))\n"
                      "flag, target, *sys.argv[1:] = sys.argv[1:]\n"
                      "sys.argv[0] = target\n"
                      "if flag == '-m':\n    runpy.run_module(target, run_name='__main__', alter_sys=True)\n"
                      "else:\n    exec(compile(target, '<string>', 'exec'), {'__name__': '__main__'})",
                *argv]
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _limit_is_enforced() -> None:
    """The limit really binds: allocating past it fails in the child."""
    result = _run(["-c", f"bytearray({MEMORY_LIMIT})"], limit_memory=True)
    assert result.returncode == 1 and "MemoryError" in result.stderr, result.stderr[-2000:]


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run `hdex argv` in this process; argparse errors exit through SystemExit."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def _assert_cli_error(code: int, err: str, fragment: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert "hdex: error: " in err and fragment in err.split("hdex: error: ", 1)[1], err


# ------------------------------------------------------------------------------------------- compile (API)

COMPILE_CASES = [
    (dict(num_device=0), ValueError, "num_device"),
    (dict(num_device=-1), ValueError, "num_device"),
    (dict(num_device=9), ValueError, "num_device must be an integer from 1 to 8"),
    (dict(num_device=100), ValueError, "num_device"),
    (dict(num_device=10**6), ValueError, "got 1000000"),
    (dict(num_device=1.0), TypeError, "num_device"),
    (dict(num_device="2"), TypeError, "num_device"),
    (dict(num_device=True), TypeError, "num_device"),
    (dict(num_device=None), TypeError, "num_device"),
    (dict(max_length=0), ValueError, "max_length"),
    (dict(max_length=1), ValueError, "max_length"),
    (dict(max_length=-5), ValueError, "max_length"),
    (dict(max_length=1.5), TypeError, "max_length"),
    (dict(max_length="64"), TypeError, "max_length"),
    (dict(max_length=True), TypeError, "max_length"),
    (dict(max_length=None), TypeError, "max_length"),
    (dict(low_memory_usage="yes"), TypeError, "low_memory_usage"),
    (dict(low_memory_usage=None), TypeError, "low_memory_usage"),
    (dict(fast_compile=1), TypeError, "fast_compile"),
    (dict(token=123), TypeError, "token"),
]


@pytest.mark.parametrize("kwargs, error, fragment", COMPILE_CASES, ids=[repr(c[0]) for c in COMPILE_CASES])
def test_compile_rejects(home, checkpoint, capsys, kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        AutoCompiler().compile(checkpoint, **kwargs)
    assert "laying out" not in capsys.readouterr().out, "checked before any work"


MODEL_ID_CASES = [
    ("/nonexistent/model", FileNotFoundError, "does not exist"),
    ("./missing-model", FileNotFoundError, "does not exist"),
    ("~/missing-model-dir", FileNotFoundError, "does not exist"),
    ("missing.gguf", FileNotFoundError, "does not exist"),
    ("some/nested/missing", FileNotFoundError, "does not exist"),
    ("", ValueError, "model_id is empty"),
    (None, TypeError, "model_id"),
    (123, TypeError, "model_id"),
    ("tiny", ValueError, "model_id 'tiny'"),
    ("org/na me", ValueError, "model_id 'org/na me' is not a valid Hub id"),
]
ENTRY_POINTS = {
    "compile": lambda model_id: AutoCompiler().compile(model_id),
    "from_pretrained": lambda model_id: AutoModelForCausalLM.from_pretrained(model_id),
    "tokenizer": lambda model_id: AutoTokenizer.from_pretrained(model_id),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("model_id, error, fragment", MODEL_ID_CASES, ids=[repr(c[0]) for c in MODEL_ID_CASES])
def test_bad_model_id(home, entry, model_id, error, fragment):
    with pytest.raises(error, match=fragment):
        ENTRY_POINTS[entry](model_id)


@pytest.mark.parametrize("kind", ["nan", "inf", "-inf"])
def test_non_finite_weights_are_a_conversion_error_naming_the_tensor(home, poisoned, kind):
    with pytest.raises(ValueError, match=r"tensor model\.norm\.weight .* (1 NaN|1 infinite)"):
        AutoCompiler().compile(poisoned(kind), max_length=MAX_LENGTH)


def test_bad_checkpoints_name_the_file(home, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="config.json"):
        AutoCompiler().compile(str(empty))
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
        AutoCompiler().compile(str(bert))
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    with pytest.raises(ValueError, match="notes.txt"):
        AutoCompiler().compile(str(text))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(ValueError, match="truncated.gguf"):
        AutoCompiler().compile(str(truncated))


def test_max_length_beyond_the_positions_is_capped_with_a_notice(home, tmp_path, capsys):
    directory = save_tiny_checkpoint("llama", tmp_path / "capped")
    model_dir = AutoCompiler().compile(str(directory), max_length=10**9)
    assert f"max_length 1000000000 exceeds the {POSITIONS} positions" in capsys.readouterr().out
    assert artifacts.read_manifest(artifacts.param_dir(model_dir, 1))["max_length"] == POSITIONS


def test_device_count_is_checked_before_the_max_length(home, tmp_path, capsys):
    """HyperDex's default max_length (4096) exceeds the tiny model's positions: the device count is what is
    wrong, and what the message says."""
    directory = save_tiny_checkpoint("llama", tmp_path / "uncompiled")
    with pytest.raises(ValueError, match="num_device") as err:
        AutoCompiler().compile(str(directory), num_device=9)
    assert "max_length" not in str(err.value)
    with pytest.raises(ValueError, match=r"device_map\['lpu'\]") as err:
        AutoModelForCausalLM.from_pretrained(str(directory), device_map={"lpu": 9})
    assert "max_length" not in str(err.value)


def test_num_device_of_a_million_fails_fast_in_bounded_memory(home, checkpoint):
    """It once laid out weights for a million devices until the kernel killed it at ~24 GB."""
    _limit_is_enforced()
    script = f"from hdex_jax.tools import AutoCompiler; AutoCompiler().compile({checkpoint!r}, num_device=10**6)"
    result = _run(["-c", script], limit_memory=True)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "ValueError: num_device must be an integer from 1 to" in result.stderr
    assert "laying out" not in result.stdout


def test_hdex_home_that_is_a_file(home, tmp_path, monkeypatch, checkpoint):
    file = tmp_path / "home-file"
    file.write_text("")
    monkeypatch.setenv("HDEX_HOME", str(file))
    for call in (lambda: AutoCompiler().compile(checkpoint), lambda: AutoModelForCausalLM.from_pretrained(checkpoint)):
        with pytest.raises(ValueError, match=r"HDEX_HOME \(.*home-file\) is a file, not a directory"):
            call()


@pytest.mark.parametrize("where", ["under-a-file", "read-only"])
def test_hdex_home_that_is_not_writable(home, tmp_path, monkeypatch, checkpoint, where):
    if where == "under-a-file":
        (tmp_path / "file").write_text("")
        path = tmp_path / "file" / "home"
    else:
        path = Path("/proc/self")  # a directory nobody, root included, can create files in
    monkeypatch.setenv("HDEX_HOME", str(path))
    with pytest.raises(ValueError, match=r"HDEX_HOME \(.*\) is not a writable directory"):
        AutoCompiler().compile(checkpoint)


def test_empty_hdex_home_means_the_default(monkeypatch):
    monkeypatch.setenv("HDEX_HOME", "")
    assert hub.hdex_home() == Path.home() / ".cache" / "hdex_jax"


def test_stale_partial_directories_of_dead_processes_are_removed(home, checkpoint, model, capsys):
    model_dir = hub.model_dir(checkpoint)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = socket.gethostname()
    stale = [model_dir / f".ckpt.partial-{host}-{dead}", model_dir / "param" / f".lpu2.partial-{host}-{dead}",
             model_dir / "param" / f".lpu1.old-{host}-{dead}"]
    kept = [model_dir / "param" / f".lpu4.partial-{host}-{os.getpid()}",  # a live process: still compiling
            model_dir / "param" / f".lpu4.partial-otherhost-{dead}"]  # another host's process: unknown here
    for directory in stale + kept:
        (directory / "state").mkdir(parents=True)
    AutoCompiler().compile(checkpoint, max_length=MAX_LENGTH)
    printed = capsys.readouterr().out
    assert not any(d.exists() for d in stale) and all(d.exists() for d in kept)
    assert all(str(d) in printed for d in stale)


# ----------------------------------------------------------------------------------- from_pretrained (API)

FROM_PRETRAINED_CASES = [
    (dict(device_map={"lpu": 9}), ValueError, r"device_map\['lpu'\] must be an integer from 1 to 8"),
    (dict(device_map={"lpu": 0}), ValueError, r"device_map\['lpu'\]"),
    (dict(device_map={"lpu": 10**6}), ValueError, r"device_map\['lpu'\]"),
    (dict(device_map={"lpu": "2"}), TypeError, r"device_map\['lpu'\]"),
    (dict(device_map={"lpu": True}), TypeError, r"device_map\['lpu'\]"),
    (dict(device_map={"lpu": 2.0}), TypeError, r"device_map\['lpu'\]"),
    (dict(device_map={"npu": 1}), ValueError, "device_map"),
    (dict(device_map={"gpu": 1}), ValueError, "device_map"),
    (dict(device_map="auto"), TypeError, "device_map"),
    (dict(device_map=2), TypeError, "device_map"),
    (dict(device_map={"gpu": -1, "lpu": 1}), ValueError, r"device_map\['gpu'\]"),
    (dict(device_map={"gpu": None, "lpu": 1}), TypeError, r"device_map\['gpu'\]"),
    (dict(device_map={"gpu": 5, "lpu": 4}), ValueError, r"device_map\['gpu'\] \+ device_map\['lpu'\]"),
    (dict(max_length=0), ValueError, "max_length"),
    (dict(max_length="64"), TypeError, "max_length"),
    (dict(max_length=False), TypeError, "max_length"),
    (dict(token=1.5), TypeError, "token"),
]


@pytest.mark.parametrize("kwargs, error, fragment", FROM_PRETRAINED_CASES,
                         ids=[repr(c[0]) for c in FROM_PRETRAINED_CASES])
def test_from_pretrained_rejects(model, checkpoint, kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)


def test_from_pretrained_without_max_length_compiles_for_the_positions(home, tmp_path, capsys):
    directory = save_tiny_checkpoint("llama", tmp_path / "implicit")
    loaded = AutoModelForCausalLM.from_pretrained(str(directory))
    printed = capsys.readouterr().out
    assert "not compiled for 1 device(s) yet" in printed
    assert f"max_length 4096 exceeds the {POSITIONS} positions" in printed
    assert loaded.max_length == POSITIONS


def test_from_pretrained_with_another_max_length_recompiles_it(model, checkpoint, capsys):
    assert AutoModelForCausalLM.from_pretrained(checkpoint, max_length=32).max_length == 32
    assert f"compiled for max_length {MAX_LENGTH}, not 32" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(checkpoint, max_length=MAX_LENGTH).max_length == MAX_LENGTH
    assert AutoModelForCausalLM.from_pretrained(checkpoint).max_length == MAX_LENGTH


# ------------------------------------------------------------------------------ generate / generate_yield

# (inputs, kwargs, error, fragment): inputs None means PROMPT.
GENERATE_CASES = [
    # inputs
    ([], {}, ValueError, "empty"),
    ([[1, 2], []], {}, ValueError, "empty"),
    ("", {}, ValueError, "empty"),
    ([1, 2, 10_000], {}, ValueError, "inputs|prompt"),
    ([-1, 2], {}, ValueError, "inputs|prompt"),
    ([1.5, 2], {}, TypeError, "inputs"),
    ([True, 2], {}, TypeError, "inputs"),
    (["a", "b", "c"], {}, TypeError, "tokenizer"),
    ([[1, 2], "abc"], {}, TypeError, "tokenizer"),
    (None, {"inputs": None}, TypeError, "inputs"),
    (42, {}, TypeError, "inputs"),
    ({"input_ids": [1, 2]}, {}, TypeError, "inputs"),
    (np.zeros((1, 2, 2), np.int64), {}, ValueError, "inputs"),
    (np.array([[1.5, 2.0]]), {}, TypeError, "inputs"),
    (list(range(1, MAX_LENGTH + 2)), {}, ValueError, "max_length"),
    # the token budget
    (None, dict(max_new_tokens=True), TypeError, "max_new_tokens"),
    (None, dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    (None, dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
    (None, dict(max_new_tokens=1.5), TypeError, "max_new_tokens"),
    (None, dict(max_new_tokens="4"), TypeError, "max_new_tokens"),
    (None, dict(max_new_tokens=10**6), ValueError, "max_new_tokens"),
    (None, dict(max_new_tokens=None, max_length=10**6), ValueError, "max_length"),
    (None, dict(max_new_tokens=None, max_length=len(PROMPT)), ValueError, "max_length"),
    (None, dict(max_new_tokens=None, max_length=True), TypeError, "max_length"),
    (None, dict(max_new_tokens=None, max_length=1.5), TypeError, "max_length"),
    # do_sample
    (None, dict(do_sample="yes"), TypeError, "do_sample"),
    (None, dict(do_sample=None), TypeError, "do_sample"),
    (None, dict(do_sample=1), TypeError, "do_sample"),
    # top_p
    (None, dict(top_p=-0.1), ValueError, "top_p"),
    (None, dict(top_p=1.5), ValueError, "top_p"),
    (None, dict(top_p=math.nan), ValueError, "top_p"),
    (None, dict(top_p="0.5"), TypeError, "top_p"),
    (None, dict(top_p=None), TypeError, "top_p"),
    # top_k
    (None, dict(top_k=-1), ValueError, "top_k"),
    (None, dict(top_k=1.5), TypeError, "top_k"),
    (None, dict(top_k=True), TypeError, "top_k"),
    (None, dict(top_k=None), TypeError, "top_k"),
    # temperature (checked when sampling, as in transformers)
    (None, dict(temperature=0.0), ValueError, "temperature"),
    (None, dict(temperature=-1.0), ValueError, "temperature"),
    (None, dict(temperature=math.nan), ValueError, "temperature"),
    (None, dict(temperature=math.inf), ValueError, "temperature"),
    (None, dict(temperature="hot"), TypeError, "temperature"),
    # repetition_penalty
    (None, dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
    (None, dict(repetition_penalty=-1.0), ValueError, "repetition_penalty"),
    (None, dict(repetition_penalty=math.nan), ValueError, "repetition_penalty"),
    (None, dict(repetition_penalty=math.inf), ValueError, "repetition_penalty"),
    (None, dict(repetition_penalty=None), TypeError, "repetition_penalty"),
    # seed: any integer from 0 to 2**64-1
    (None, dict(seed=-1), ValueError, "seed"),
    (None, dict(seed=2**64), ValueError, "seed"),
    (None, dict(seed=2**70), ValueError, "seed"),
    (None, dict(seed=1.5), TypeError, "seed"),
    (None, dict(seed=True), TypeError, "seed"),
    (None, dict(seed="0"), TypeError, "seed"),
    (None, dict(seed=[1, 2]), ValueError, "seed"),
    # stop: token ids only; a str (even "") is a TypeError saying so
    (None, dict(stop=""), TypeError, "stop"),
    (None, dict(stop="</s>"), TypeError, "stop"),
    (None, dict(stop=10**6), ValueError, "stop"),
    (None, dict(stop=-1), ValueError, "stop"),
    (None, dict(stop=1.5), TypeError, "stop"),
    (None, dict(stop=[1, "a"]), TypeError, "stop"),
    (None, dict(stop=True), TypeError, "stop"),
    # streamer
    (None, dict(streamer=object()), TypeError, "streamer"),
    (None, dict(streamer="yes"), TypeError, "streamer"),
    ([[1, 2], [3, 4]], dict(streamer="text streamer"), (TypeError, ValueError), "streamer"),
]


def _generate_args(inputs, kwargs):
    call = dict(max_new_tokens=4, do_sample=True)
    call.update(kwargs)
    if "inputs" in call:
        return call.pop("inputs"), call
    return (PROMPT if inputs is None else inputs), call


def _case_id(case: tuple) -> str:
    """A stable test id (no object addresses)."""
    def show(value):
        return type(value).__name__ if type(value) is object else repr(value)
    inputs, kwargs = case[0], case[1]
    return f"{show(inputs):.30}-" + ",".join(f"{k}={show(v):.30}" for k, v in kwargs.items())


@pytest.mark.parametrize("inputs, kwargs, error, fragment", GENERATE_CASES, ids=map(_case_id, GENERATE_CASES))
def test_generate_rejects(model, inputs, kwargs, error, fragment):
    inputs, call = _generate_args(inputs, kwargs)
    if call.get("streamer") == "text streamer":
        call["streamer"] = TextStreamer(model.tokenizer, use_print=False)
    with pytest.raises(error, match=fragment) as err:
        model.generate(inputs, **call)
    if "max_length" in kwargs:
        assert "max_new_tokens" not in str(err.value), "max_new_tokens was not passed"


YIELD_CASES = [c for c in GENERATE_CASES if c[1] and "streamer" not in c[1]][::3] + [
    (None, dict(streamer=object()), TypeError, "streamer"),
    ([], {}, ValueError, "empty"),
]


@pytest.mark.parametrize("inputs, kwargs, error, fragment", YIELD_CASES, ids=map(_case_id, YIELD_CASES))
def test_generate_yield_rejects_when_called(model, inputs, kwargs, error, fragment):
    """The generator is checked when it is created, not at its first next()."""
    inputs, call = _generate_args(inputs, kwargs)
    with pytest.raises(error, match=fragment):
        model.generate_yield(inputs, **call)


def test_top_p_error_states_the_accepted_range(model):
    with pytest.raises(ValueError, match="top_p") as err:
        model.generate(PROMPT, max_new_tokens=2, top_p=1.5)
    assert "> 0 and < 1" not in str(err.value)


@pytest.mark.parametrize("kwargs", [dict(top_p=0.0), dict(top_p=1.0), dict(top_p=0), dict(top_p=1), dict(top_k=0),
                                    dict(temperature=0.0, do_sample=False), dict(seed=np.uint64(2**64 - 1)),
                                    dict(seed=2**64 - 1), dict(seed=np.int64(3)), dict(do_sample=np.bool_(True))])
def test_generate_accepts_the_edges_of_each_range(model, kwargs):
    call = dict(max_new_tokens=2, do_sample=True, stop=[])
    call.update(kwargs)
    assert len(model.generate(PROMPT, **call)) == len(PROMPT) + 2


def test_every_64_bit_seed_is_its_own(model):
    """Seeds were truncated to 32 bits: 2**32 gave the tokens of 0."""
    kwargs = dict(max_new_tokens=12, do_sample=True, top_k=0, top_p=1.0, temperature=1.5, repetition_penalty=1.0,
                  stop=[])
    tokens = {seed: tuple(model.generate(PROMPT, seed=seed, **kwargs)) for seed in (0, 2**32, 2**63, 2**64 - 1)}
    assert len(set(tokens.values())) == len(tokens)
    assert tuple(model.generate(PROMPT, seed=2**64 - 1, **kwargs)) == tokens[2**64 - 1]


# ------------------------------------------------------------------------------------------ estimate (API)

def _config() -> ModelConfig:
    import converters

    return converters.config_from_hf(tiny_hf_config("llama").to_dict())


CFG = _config()
ESTIMATE_CASES = [
    ((CFG, 0, 0), {}, ValueError, "num_device"),
    ((CFG, -4, 0), {}, ValueError, "num_device"),
    ((CFG, 1.5, 0), {}, TypeError, "num_device"),
    ((CFG, True, 0), {}, TypeError, "num_device"),
    ((CFG, None, 0), {}, TypeError, "num_device"),
    ((CFG, 1, -1), {}, ValueError, "context_len"),
    ((CFG, 1, 0.5), {}, TypeError, "context_len"),
    ((CFG, 1, 10**9), {}, ValueError, "context_len"),
    ((CFG, 1, 0), dict(batch=0), ValueError, "batch"),
    ((CFG, 1, 0), dict(batch=True), TypeError, "batch"),
    ((CFG, 1, 0), dict(dtype="float13"), ValueError, "dtype"),
    ((CFG, 1, 0), dict(dtype="object"), ValueError, "dtype"),
    ((CFG, 1, 0), dict(dtype=None), TypeError, "dtype"),
    ((CFG, 1, 0), dict(preset="tpu"), ValueError, "preset"),
    ((CFG, 1, 0), dict(preset=3), TypeError, "preset"),
    ((CFG, 1, 0), dict(preset=["asic"]), TypeError, "preset"),
    ((42, 1, 0), {}, TypeError, "config must be"),
    ((None, 1, 0), {}, TypeError, "config must be"),
    ((["llama"], 1, 0), {}, TypeError, "config must be"),
    (("", 1, 0), {}, ValueError, "config is empty"),
    (("/nonexistent/config.json", 1, 0), {}, FileNotFoundError, "does not exist"),
    (("nobody/no-such-model", 1, 0), {}, FileNotFoundError, "no model 'nobody/no-such-model'"),
    (({"model_type": "bert"}, 1, 0), {}, ValueError, "bert"),
    (({}, 1, 0), {}, ValueError, "model_type None"),
    (({"model_type": "llama"}, 1, 0), {}, ValueError, "hidden_size|vocab_size|num_"),
]


@pytest.mark.parametrize("args, kwargs, error, fragment", ESTIMATE_CASES,
                         ids=[f"{c[0][1:]!r}-{c[1]!r}-{type(c[0][0]).__name__}" for c in ESTIMATE_CASES])
def test_estimate_rejects(home, args, kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        estimate(*args, **kwargs)


@pytest.fixture(scope="module")
def config_forms(tmp_path_factory, model, checkpoint):
    """The tiny llama's description in every form `estimate` takes."""
    root = tmp_path_factory.mktemp("forms")
    compiled = hub.model_dir(checkpoint)
    named = Path(os.environ["HDEX_HOME"]) / "hub" / "someorg" / "tiny" / "ckpt"
    named.mkdir(parents=True)
    model_config = ModelConfig.load(artifacts.ckpt_dir(compiled))
    model_config.save(named)
    write_tiny_gguf(root / "tiny.gguf")
    hf = tiny_hf_config("llama")
    return {
        "ModelConfig": model_config,
        "dict": json.loads((Path(checkpoint) / "config.json").read_text()),
        "PretrainedConfig": hf,
        "config.json": str(Path(checkpoint) / "config.json"),
        "config.json Path": Path(checkpoint) / "config.json",
        "HF directory": checkpoint,
        "compiled model directory": str(compiled),
        "compiled ckpt directory": str(artifacts.ckpt_dir(compiled)),
        "hdex_config.json": str(artifacts.ckpt_dir(compiled) / "hdex_config.json"),
        "gguf": str(root / "tiny.gguf"),
        "compiled model id": "someorg/tiny",
    }


@pytest.mark.parametrize("form", ["ModelConfig", "dict", "PretrainedConfig", "config.json", "config.json Path",
                                  "HF directory", "compiled model directory", "compiled ckpt directory",
                                  "hdex_config.json", "gguf", "compiled model id"])
def test_estimate_takes_the_model_in_every_form(config_forms, form):
    expected = estimate(config_forms["ModelConfig"], 2, 50).ms_per_token
    assert estimate(config_forms[form], 2, 50).ms_per_token == pytest.approx(expected)


# ----------------------------------------------------------------------------------------------------- CLI

CLI_CASES = [
    # hdex compile
    (["compile", "{ckpt}", "--num-device", "9"], "--num-device must be an integer from 1 to 8"),
    (["compile", "{ckpt}", "--num-device", "0"], "--num-device"),
    (["compile", "{ckpt}", "--num-device", "-1"], "--num-device"),
    (["compile", "{ckpt}", "--num-device", "x"], "--num-device"),
    (["compile", "{ckpt}", "--num-device", "1.5"], "--num-device"),
    (["compile", "{ckpt}", "--max-length", "1"], "--max-length"),
    (["compile", "{ckpt}", "--max-length", "-5"], "--max-length"),
    (["compile", "{ckpt}", "--max-length", "abc"], "--max-length"),
    (["compile", "/nonexistent/model"], "does not exist"),
    (["compile", "tiny"], "model_id 'tiny'"),
    (["compile", "org/na me"], "not a valid Hub id"),
    (["compile", "{nan}"], "model.norm.weight"),
    (["compile"], "model"),
    (["compile", "{ckpt}", "--bogus"], "--bogus"),
    # hdex generate
    (["generate", "hi", "--model", "{ckpt}", "--num-device", "9"], "--num-device must be an integer from 1 to 8"),
    (["generate", "hi", "--model", "{ckpt}", "--num-device", "0"], "--num-device"),
    (["generate", "hi", "--model", "{ckpt}", "--seed", str(2**70)], "--seed"),
    (["generate", "hi", "--model", "{ckpt}", "--seed", str(2**64)], "--seed"),
    (["generate", "hi", "--model", "{ckpt}", "--seed", "-1"], "--seed"),
    (["generate", "hi", "--model", "{ckpt}", "--seed", "1.5"], "--seed"),
    (["generate", "hi", "--model", "{ckpt}", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "hi", "--model", "{ckpt}", "--max-new-tokens", "-3"], "--max-new-tokens"),
    (["generate", "hi", "--model", "{ckpt}", "--max-new-tokens", "x"], "--max-new-tokens"),
    (["generate", "hi", "--model", "{ckpt}", "--top-p", "1.5"], "--top-p must be a number from 0 to 1"),
    (["generate", "hi", "--model", "{ckpt}", "--top-p", "-0.1"], "--top-p"),
    (["generate", "hi", "--model", "{ckpt}", "--top-p", "nan"], "--top-p"),
    (["generate", "hi", "--model", "{ckpt}", "--top-k", "-1"], "--top-k"),
    (["generate", "hi", "--model", "{ckpt}", "--do-sample", "--temperature", "0"], "--temperature"),
    (["generate", "hi", "--model", "{ckpt}", "--do-sample", "--temperature", "nan"], "--temperature"),
    (["generate", "hi", "--model", "{ckpt}", "--repetition-penalty", "0"], "--repetition-penalty"),
    (["generate", "hi", "--model", "{ckpt}", "--repetition-penalty", "inf"], "--repetition-penalty"),
    (["generate", "hi", "--model", "/nonexistent/model"], "does not exist"),
    (["generate", "hi", "--model", "tiny"], "model_id 'tiny'"),
    (["generate", "", "--model", "{ckpt}"], "prompt is empty"),
    (["generate"], "prompt"),
    (["generate", "hi", "--max-length", "8"], "--max-length"),
    # hdex estimate
    (["estimate", "{ckpt}", "--devices", "0,2"], "--devices must be"),
    (["estimate", "{ckpt}", "--devices", "two"], "--devices"),
    (["estimate", "{ckpt}", "--devices", ""], "devices is empty"),
    (["estimate", "{ckpt}", "--context", "-5"], "--context must be"),
    (["estimate", "{ckpt}", "--context", "x"], "--context"),
    (["estimate", "{ckpt}", "--context", "100000"], "--context 100000"),
    (["estimate", "{ckpt}", "--batch", "0"], "--batch must be"),
    (["estimate", "{ckpt}", "--dtype", "float13"], "dtype"),
    (["estimate", "{ckpt}", "--preset", "tpu"], "preset"),
    (["estimate", "/nonexistent/config.json"], "does not exist"),
    (["estimate", "nobody/no-such-model"], "no model 'nobody/no-such-model'"),
    (["estimate", "{tmp}"], "config.json"),
    # hdex itself
    ([], "command"),
    (["bogus"], "bogus"),
    (["models", "extra"], "extra"),
]


@pytest.mark.parametrize("argv, fragment", CLI_CASES, ids=[" ".join(c[0]) or "(nothing)" for c in CLI_CASES])
def test_cli_rejects(model, checkpoint, poisoned, tmp_path, capsys, argv, fragment):
    values = {"ckpt": checkpoint, "tmp": str(tmp_path)}
    if "{nan}" in argv:
        values["nan"] = poisoned("nan")
    code, out, err = _cli([arg.format(**values) for arg in argv], capsys)
    _assert_cli_error(code, err, fragment)
    assert "max_length" not in err or "--max-length" in " ".join(argv), "the user gave no max_length"


@pytest.mark.parametrize("command", ["compile", "generate", "estimate"])
@pytest.mark.parametrize("where", ["file", "under-a-file", "read-only"])
def test_cli_unusable_hdex_home(checkpoint, tmp_path, monkeypatch, capsys, command, where):
    (tmp_path / "file").write_text("")
    path = {"file": tmp_path / "file", "under-a-file": tmp_path / "file" / "home", "read-only": "/proc/self"}[where]
    monkeypatch.setenv("HDEX_HOME", str(path))
    argv = {"compile": ["compile", checkpoint], "generate": ["generate", "hi", "--model", checkpoint],
            "estimate": ["estimate", "someorg/some-model"]}[command]
    code, _, err = _cli(argv, capsys)
    if where == "file" or command != "estimate":
        _assert_cli_error(code, err, "HDEX_HOME")
    else:
        # estimate only reads: a cache it cannot write is no obstacle, and the error is about the missing model.
        _assert_cli_error(code, err, "no model 'someorg/some-model'")


def test_cli_compile_caps_max_length_with_a_notice(home, tmp_path, capsys):
    directory = save_tiny_checkpoint("llama", tmp_path / "cli-capped")
    code, out, err = _cli(["compile", str(directory), "--max-length", "100000"], capsys)
    assert code == 0, err
    assert f"max_length 100000 exceeds the {POSITIONS} positions" in out


def test_cli_generate_compiles_an_uncompiled_model_for_its_positions(home, tmp_path, capsys):
    """`hdex generate` has no --max-length: the default must not become an error about it."""
    directory = save_tiny_checkpoint("llama", tmp_path / "cli-implicit")
    code, out, err = _cli(["generate", "hello", "--model", str(directory), "--max-new-tokens", "3", "--raw"],
                          capsys)
    assert code == 0, err
    assert f"max_length 4096 exceeds the {POSITIONS} positions" in err  # notices on stderr, the answer on stdout


def test_cli_generate_accepts_the_largest_seed(model, checkpoint, capsys):
    code, _, err = _cli(["generate", "hello", "--model", checkpoint, "--max-new-tokens", "3", "--raw", "--do-sample",
                         "--seed", str(2**64 - 1)], capsys)
    assert code == 0, err


@pytest.mark.parametrize("argv, fragment", [
    (["compile", "{ckpt}", "--num-device", str(10**6)], "--num-device"),
    (["generate", "hi", "--model", "{ckpt}", "--seed", str(2**70)], "--seed"),
    (["compile", "{ckpt}", "--hdex-home-file"], "HDEX_HOME"),
], ids=["num-device-million", "seed-2**70", "hdex-home-file"])
def test_cli_in_a_real_process_bounded_memory(model, checkpoint, tmp_path, monkeypatch, argv, fragment):
    """A real `hdex` process under a 4 GB address-space limit: one error line, exit 2, no traceback."""
    if "--hdex-home-file" in argv:
        argv = argv[:-1]
        (tmp_path / "file").write_text("")
        monkeypatch.setenv("HDEX_HOME", str(tmp_path / "file"))
    result = _run(["-m", "hdex_jax.cli", *[a.format(ckpt=checkpoint) for a in argv]], limit_memory=True)
    _assert_cli_error(result.returncode, result.stderr, fragment)
