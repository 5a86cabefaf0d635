"""The HyperDex-style API end to end on a tiny Llama: compile, load, generate in every input form, stream,
seeds, and bad input."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

from hdex_jax import artifacts, hub
from hdex_jax.tools import AutoCompiler
from hdex_jax.transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer
from tests.helpers_tiny import save_tiny_checkpoint, save_tiny_model, save_tiny_tokenizer

MAX_LENGTH = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = save_tiny_checkpoint("llama", tmp_path_factory.mktemp("ckpt") / "tiny-llama")
    return str(directory)


@pytest.fixture(scope="module")
def model(home, checkpoint):
    AutoCompiler().compile(checkpoint, num_device=1, max_length=MAX_LENGTH)
    return AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"lpu": 1})


def _reference_greedy(checkpoint, prompt, n, repetition_penalty=1.0):
    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n,
                                 repetition_penalty=repetition_penalty, pad_token_id=0)
    return out[0].tolist()


def test_compile_prints_phases_and_recompile_is_quick(home, checkpoint, model, capsys):
    AutoCompiler().compile(checkpoint, num_device=1, max_length=MAX_LENGTH)
    printed = capsys.readouterr().out
    assert "already converted" in printed and "already compiled" in printed
    model_dir = hub.model_dir(checkpoint)
    assert artifacts.read_manifest(artifacts.ckpt_dir(model_dir)) is not None
    assert artifacts.read_manifest(artifacts.param_dir(model_dir, 1))["max_length"] == MAX_LENGTH


def test_output_mirrors_input_type_and_matches_transformers(model, checkpoint):
    prompt = [3, 17, 42, 9, 5]
    kwargs = dict(max_new_tokens=8, do_sample=False, repetition_penalty=1.0, stop=[])
    expected = _reference_greedy(checkpoint, prompt, 8)
    assert model.generate(prompt, **kwargs) == expected
    assert model.generate([prompt, prompt[:3]], **kwargs)[0] == expected
    array = model.generate(np.asarray([prompt]), **kwargs)
    assert isinstance(array, np.ndarray) and array.tolist() == [expected]
    assert isinstance(model.generate(jax.numpy.asarray([prompt]), **kwargs), jax.Array)
    text = model.generate("hello world", **kwargs)
    assert isinstance(text, str)


def test_repetition_penalty_greedy_matches_transformers(model, checkpoint):
    prompt = [3, 17, 42, 9, 5, 3, 17]
    expected = _reference_greedy(checkpoint, prompt, 12, repetition_penalty=1.3)
    assert model.generate(prompt, max_new_tokens=12, do_sample=False, repetition_penalty=1.3, stop=[]) == expected


def test_stop_token_ends_row_and_is_kept(model):
    prompt = [3, 17, 42, 9, 5]
    free = model.generate(prompt, max_new_tokens=10, do_sample=False, stop=[])
    stop = free[len(prompt) + 3]
    stopped = model.generate(prompt, max_new_tokens=10, do_sample=False, stop=stop)
    first = free.index(stop, len(prompt))
    assert stopped == free[: first + 1]


def test_generate_yield_and_streaming_give_identical_tokens(model):
    prompt = [3, 17, 42, 9, 5]
    kwargs = dict(max_new_tokens=12, do_sample=True, top_k=20, top_p=0.9, temperature=0.9, seed=7, stop=[])
    full = model.generate(prompt, **kwargs)
    yielded = list(model.generate_yield(prompt, **kwargs))
    assert full == prompt + yielded
    streamer = TextStreamer(model.tokenizer, use_print=False)
    streamed = model.generate(prompt, streamer=streamer, **kwargs)
    assert streamed == full
    pieces = list(model.generate_yield(prompt, streamer=TextStreamer(model.tokenizer, use_print=False), **kwargs))
    assert "".join(pieces) == model.tokenizer.decode(full)


def test_seeds_reproducible_differ_and_independent_of_other_rows(model):
    prompts = [[3, 17, 42, 9, 5], [8, 8, 1], [60, 2, 2, 7]]
    kwargs = dict(max_new_tokens=12, do_sample=True, top_k=0, top_p=1.0, temperature=1.5, repetition_penalty=1.0,
                  stop=[])
    first = model.generate(prompts, seed=3, **kwargs)
    assert model.generate(prompts, seed=3, **kwargs) == first
    assert model.generate(prompts, seed=4, **kwargs) != first
    changed = model.generate([prompts[0], [9, 9, 9, 9], [1, 2]], seed=3, **kwargs)
    assert changed[0] == first[0]
    assert model.generate(prompts[0], seed=3, **kwargs) == first[0]


def test_same_seed_same_tokens_in_another_process(model, checkpoint, home):
    prompt = [3, 17, 42, 9, 5]
    kwargs = dict(max_new_tokens=10, do_sample=True, top_k=0, top_p=1.0, temperature=1.5, stop=[], seed=11)
    here = model.generate(prompt, **kwargs)
    script = (
        "import json, sys\n"
        "from hdex_jax.transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({checkpoint!r})\n"
        f"print(json.dumps(m.generate({prompt!r}, **{kwargs!r})))\n"
    )
    env = {**os.environ, "HDEX_HOME": str(home), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here


def test_tokenizer_from_compiled_model(model, checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert tokenizer.encode("hello world") == model.tokenizer.encode("hello world")


def test_prompt_plus_new_tokens_over_max_length(model):
    with pytest.raises(ValueError, match="max_length"):
        model.generate(list(range(1, 60)), max_new_tokens=10)


def test_bad_device_map(model, checkpoint):
    for device_map, error in (({"npu": 1}, ValueError), ({"lpu": 0}, ValueError), ({"lpu": "2"}, TypeError)):
        with pytest.raises(error, match="device_map"):
            AutoModelForCausalLM.from_pretrained(checkpoint, device_map=device_map)


def test_interrupted_compile_leaves_nothing_loadable(home, checkpoint, model, monkeypatch):
    """A compile killed while writing params leaves no complete layout; the next load compiles it afresh."""
    model_dir = hub.model_dir(checkpoint)
    target = artifacts.param_dir(model_dir, 2)

    def interrupted(directory, params):
        (directory / "state").mkdir()
        (directory / "state" / "half-written").write_bytes(b"\0" * 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(artifacts, "save_params", interrupted)
    with pytest.raises(KeyboardInterrupt):
        AutoCompiler().compile(checkpoint, num_device=2, max_length=MAX_LENGTH)
    assert artifacts.read_manifest(target) is None
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir()] == ["lpu1"]


def test_interrupted_conversion_leaves_no_checkpoint(home, tmp_path, monkeypatch):
    directory = save_tiny_checkpoint("qwen2", tmp_path / "tiny-qwen2")
    ckpt = artifacts.ckpt_dir(hub.model_dir(str(directory)))

    def interrupted(directory, cfg, flat):
        (directory / artifacts.WEIGHTS_FILE).write_bytes(b"\0" * 100)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(artifacts, "write_ckpt", interrupted)
        with pytest.raises(KeyboardInterrupt):
            AutoCompiler().compile(str(directory), max_length=MAX_LENGTH)
    assert not ckpt.exists() and [p.name for p in ckpt.parent.iterdir()] == [artifacts.LOCK_FILE]
    AutoCompiler().compile(str(directory), max_length=MAX_LENGTH)
    assert artifacts.read_manifest(ckpt) is not None


def test_unknown_model_type_lists_supported(home, tmp_path):
    directory = tmp_path / "weird"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ValueError, match="llama") as err:
        AutoCompiler().compile(str(directory))
    assert "bert" in str(err.value)
    assert artifacts.read_manifest(artifacts.ckpt_dir(hub.model_dir(str(directory)))) is None


def test_another_checkpoint_with_the_same_name_is_compiled_afresh(home, tmp_path, capsys):
    first = save_tiny_model("llama", tmp_path / "a" / "same-name", seed=1)
    second = save_tiny_model("opt", tmp_path / "b" / "same-name", seed=2)
    for directory in (first, second):
        save_tiny_tokenizer(directory)
    AutoCompiler().compile(str(first), max_length=MAX_LENGTH)
    model_dir = AutoCompiler().compile(str(second), max_length=MAX_LENGTH)
    assert "compiling afresh" in capsys.readouterr().out
    loaded = AutoModelForCausalLM.from_pretrained(str(second))
    assert loaded.config.model_type == "opt"
    assert artifacts.read_manifest(artifacts.ckpt_dir(model_dir))["source"] == str(second.resolve())


def test_scores_and_logits_match_transformers(model, checkpoint):
    """return_dict_in_generate with output_scores/output_logits: transformers' names, shapes and values."""
    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompt, n = [3, 17, 42, 9, 5], 8
    ours = model.generate(prompt, max_new_tokens=n, do_sample=False, repetition_penalty=1.3, stop=[],
                          return_dict_in_generate=True, output_scores=True, output_logits=True)
    with torch.no_grad():
        ref = reference.generate(torch.tensor([prompt]), do_sample=False, repetition_penalty=1.3, max_new_tokens=n,
                                 min_new_tokens=n, pad_token_id=0, return_dict_in_generate=True, output_scores=True,
                                 output_logits=True)
    assert ours.sequences == ref.sequences[0].tolist()
    assert len(ours.scores) == len(ref.scores) == n and ours.scores[0].shape == tuple(ref.scores[0].shape)
    # min_new_tokens (which keeps transformers from stopping early) sets its scores of eos to -inf; the rest agree.
    other = np.arange(model.config.vocab_size) != model.config.eos_token_ids[0]
    for step in range(n):
        np.testing.assert_allclose(ours.scores[step][:, other], ref.scores[step].numpy()[:, other], atol=1e-4, rtol=0)
        np.testing.assert_allclose(ours.logits[step], ref.logits[step].numpy(), atol=1e-4, rtol=0)
    # The helper against transformers' own, on the same scores.
    expected = reference.compute_transition_scores(ref.sequences, tuple(torch.tensor(x) for x in ours.scores),
                                                   normalize_logits=True).numpy()
    np.testing.assert_allclose(ours.compute_transition_scores(normalize_logits=True), expected, atol=1e-4, rtol=0)
    # Sampling: the first step's scores went through temperature, top-k and top-p, with -inf where removed.
    warped = model.generate([prompt, prompt[:3]], max_new_tokens=3, do_sample=True, temperature=0.7, top_k=5,
                            top_p=0.9, seed=1, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        first = reference.generate(torch.tensor([prompt]), do_sample=True, temperature=0.7, top_k=5, top_p=0.9,
                                   repetition_penalty=1.2, max_new_tokens=1, pad_token_id=0,
                                   return_dict_in_generate=True, output_scores=True).scores[0][0].numpy()
    np.testing.assert_array_equal(np.isinf(warped.scores[0][0]), np.isinf(first))
    finite = np.isfinite(first)
    np.testing.assert_allclose(warped.scores[0][0][finite], first[finite], atol=1e-4, rtol=0)
    log_probs = warped.compute_transition_scores(normalize_logits=True)
    assert log_probs.shape == (2, len(warped.scores)) and np.all(log_probs[:, 0] <= 0)
    with pytest.raises(ValueError, match="return_dict_in_generate"):
        model.generate(prompt, max_new_tokens=2, output_scores=True)


def test_checkpoint_without_tokenizer_runs_on_token_ids(home, tmp_path, capsys):
    directory = save_tiny_model("llama", tmp_path / "no-tokenizer")
    AutoCompiler().compile(str(directory), num_device=1, max_length=MAX_LENGTH)
    assert "no tokenizer files" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(str(directory), device_map={"lpu": 1})
    assert model.tokenizer is None
    prompt = [3, 17, 42, 9, 5]
    kwargs = dict(max_new_tokens=6, do_sample=False, repetition_penalty=1.0, stop=[])
    assert model.generate(prompt, **kwargs) == _reference_greedy(str(directory), prompt, 6)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        model.generate("Hello", **kwargs)
    from hdex_jax.cli import main

    assert main(["generate", "Hello", "--model", str(directory), "--max-new-tokens", "2"]) == 2
    assert "has no tokenizer" in capsys.readouterr().err
