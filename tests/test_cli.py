"""The command line as a newcomer meets it: only answers on standard output, several prompts as one batch,
`hdex score`, defaults in --help, flag names in errors, notices before a recompile, a quick failure for a Hub id
that cannot be reached."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants

from hdex_jax.cli import build_parser, main
from hdex_jax.transformers import AutoModelForCausalLM
from tests.helpers_tiny import save_tiny_checkpoint

MAX_LENGTH = 64
GREEDY = ["--max-new-tokens", "4", "--raw"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(save_tiny_checkpoint("llama", tmp_path_factory.mktemp("cli") / "tiny-llama-cli"))


def generate(capsys, checkpoint, *argv):
    assert main(["generate", *argv, "--model", checkpoint, *GREEDY]) == 0
    return capsys.readouterr()


def test_generate_writes_only_the_answer_on_stdout(home, checkpoint, capsys):
    # The first run compiles the model: its phases go to stderr.
    printed = generate(capsys, checkpoint, "the cat")
    assert "Phase" in printed.err and "[hdex]" not in printed.out
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    ids = model.tokenizer.encode("the cat")
    expected = model.generate(ids, max_new_tokens=4, do_sample=False)[len(ids):]
    assert printed.out == model.tokenizer.decode(expected, skip_special_tokens=True) + "\n"


def test_several_prompts_run_as_one_batch_each_answer_labelled(home, checkpoint, capsys, tmp_path):
    alone = {p: generate(capsys, checkpoint, p).out.rstrip("\n") for p in ("the cat", "a dog", "it is")}
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("it is\n\n")
    out = generate(capsys, checkpoint, "--prompt", "the cat", "--prompt", "a dog", "--prompts-file",
                   str(prompts_file)).out
    assert out == "\n".join(f"{'' if i == 0 else chr(10)}[{i + 1}] {p}\n{alone[p]}"
                            for i, p in enumerate(alone)) + "\n"
    assert generate(capsys, checkpoint, "the cat|a dog|it is").out == out


def test_score_prints_the_perplexity_of_a_file_or_stdin(home, checkpoint, capsys, tmp_path, monkeypatch):
    text = "the rain in spain stays mainly in the plain. " * 3
    path = tmp_path / "text.txt"
    path.write_text(text)
    assert main(["score", str(path), "--model", checkpoint, "--window", "32", "--stride", "16"]) == 0
    printed = capsys.readouterr()
    expected = AutoModelForCausalLM.from_pretrained(checkpoint).perplexity(text, window=32, stride=16)
    figure, tokens = float(printed.out.split()[1]), int(printed.out.split()[3])
    assert figure == pytest.approx(expected.perplexity, rel=1e-4) and tokens == expected.tokens
    assert math.isfinite(figure) and printed.out.count("\n") == 1
    monkeypatch.setattr("sys.stdin", open(path))
    assert main(["score", "-", "--model", checkpoint, "--window", "32", "--stride", "16"]) == 0
    # The same figure and tokens; only the speed differs.
    assert capsys.readouterr().out.split("(")[0] == printed.out.split("(")[0]


def test_perplexity_script_equals_transformers(home, checkpoint, capsys, tmp_path, monkeypatch):
    scripts = Path(__file__).parent.parent / "scripts"
    monkeypatch.syspath_prepend(str(scripts))  # the script imports bench_decode beside it
    spec = importlib.util.spec_from_file_location("perplexity_script", scripts / "perplexity.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    path = tmp_path / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog; " * 4)
    monkeypatch.setattr(sys, "argv", ["perplexity.py", str(path), "--model", checkpoint, "--window", "40",
                                      "--stride", "20", "--compare"])
    script.main()
    ours, theirs = capsys.readouterr().out.splitlines()
    assert ours.split()[2] == theirs.split()[2] and ours.split()[4] == theirs.split()[4]  # figure, tokens


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["generate", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for fragment in ("(default: 0.7)", "(default: 1,", "(default: 1.0)", "(default: 1.2)", "(default: 128)",
                     "still picks the top token"):
        assert fragment in " ".join(text.split()), fragment


def test_estimate_errors_name_their_flags(home, checkpoint, capsys):
    for argv, fragment in ((["--devices", "0"], "--devices"), (["--context", "100000"], "--context"),
                           (["--batch", "0"], "--batch")):
        assert main(["estimate", checkpoint, *argv]) == 2
        assert fragment in capsys.readouterr().err


def test_unreachable_hub_fails_in_one_line(home, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    assert main(["generate", "hi", "--model", "nobody/no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be reached" in err and "no-such-model" in err


def test_compile_for_another_max_length_says_what_it_redoes(home, checkpoint, capsys):
    main(["generate", "hi", "--model", checkpoint, *GREEDY])  # compiled for the default max_length
    capsys.readouterr()
    assert main(["compile", checkpoint, "--max-length", "32"]) == 0
    err = capsys.readouterr().err
    assert "is compiled for max_length 128" in err and "compiling for 32 exports its programs again" in err
