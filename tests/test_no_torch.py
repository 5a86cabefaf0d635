"""The runtime never needs torch: in a process where `import torch` fails (as in an environment with only the
runtime dependencies), compile + tokenizer + generate work on a tiny Hugging Face llama and on a tiny GGUF, and
so does `hdex generate`; no torch module gets loaded. Tokens and greedy output equal transformers' (with torch,
in this process) on the same checkpoints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from tests.helpers_tiny import CHAT_TEMPLATE, save_tiny_model, save_tiny_tokenizer, write_tiny_gguf

REPO = Path(__file__).resolve().parents[1]
PROMPT = "the cat is on the mat"
NEW_TOKENS = 4

# Run with the prompt and the checkpoints as arguments; per checkpoint, prints a JSON line (prompt ids and greedy
# output of the Python API), then what `hdex generate` printed between CLI-BEGIN and CLI-END.
SCRIPT = """
import json, sys
# What a missing package looks like to importers: `import torch` raises ImportError and
# importlib.util.find_spec("torch") is None, so transformers reports torch unavailable.
sys.modules["torch"] = None

from hdex_jax.cli import main
from hdex_jax.tools import AutoCompiler
from hdex_jax.transformers import AutoModelForCausalLM, AutoTokenizer

for source in sys.argv[2:]:
    AutoCompiler().compile(model_id=source, num_device=1, max_length=64)
    model = AutoModelForCausalLM.from_pretrained(source, device_map={"lpu": 1})
    ids = AutoTokenizer.from_pretrained(source).encode(sys.argv[1])
    out = model.generate(ids, max_new_tokens=%(new)d, do_sample=False, repetition_penalty=1.0)
    print(json.dumps({"source": source, "ids": ids, "out": out}), flush=True)
    print("CLI-BEGIN", flush=True)
    assert main(["generate", sys.argv[1], "--model", source, "--max-new-tokens", "%(new)d"]) == 0
    print("CLI-END", flush=True)

loaded = sorted(name for name, module in sys.modules.items() if name.split(".")[0] == "torch" and module is not None)
assert not loaded, f"torch modules were loaded: {loaded}"
print("NO-TORCH-OK")
""" % {"new": NEW_TOKENS}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny HF llama directory (with a tokenizer) and a tiny llama GGUF with a chat template."""
    directory = tmp_path_factory.mktemp("no_torch")
    hf_dir = save_tiny_tokenizer(save_tiny_model("llama", directory / "tiny-llama"))
    gguf_path = directory / "tiny.gguf"
    write_tiny_gguf(gguf_path, "Q8_0", chat_template=CHAT_TEMPLATE)
    return hf_dir, gguf_path


def _greedy_reference(model: torch.nn.Module, ids: list[int], repetition_penalty: float = 1.0) -> list[int]:
    with torch.no_grad():
        return model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0,
                              repetition_penalty=repetition_penalty)[0].tolist()


def _cli_reference(tokenizer, model: torch.nn.Module) -> str:
    """What `hdex generate PROMPT` prints: the greedy continuation (HyperDex's repetition penalty 1.2) of the
    prompt as a chat turn when the tokenizer has a chat template, else of the raw prompt."""
    if tokenizer.chat_template:
        ids = list(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=False))
    else:
        ids = tokenizer.encode(PROMPT)
    out = _greedy_reference(model, ids, repetition_penalty=1.2)
    return tokenizer.decode(out[len(ids):], skip_special_tokens=True)


def test_compile_and_generate_without_torch(checkpoints: tuple[Path, Path], home: Path) -> None:
    hf_dir, gguf_path = checkpoints
    env = {**os.environ, "HDEX_HOME": str(home), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", SCRIPT, PROMPT, str(hf_dir), str(gguf_path)], capture_output=True,
                         text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.rstrip().endswith("NO-TORCH-OK"), run.stdout[-2000:]
    lines = run.stdout.splitlines()
    results = {r["source"]: r for r in (json.loads(line) for line in lines if line.startswith('{"source"'))}
    assert list(results) == [str(hf_dir), str(gguf_path)]
    begins = [i for i, line in enumerate(lines) if line == "CLI-BEGIN"]
    printed = ["\n".join(lines[i + 1:lines.index("CLI-END", i)]).strip() for i in begins]

    references = {
        str(hf_dir): (transformers.AutoTokenizer.from_pretrained(hf_dir),
                      transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)),
        str(gguf_path): (transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name),
                         transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                                           dtype=torch.float32)),
    }
    assert references[str(gguf_path)][0].chat_template == CHAT_TEMPLATE  # so the CLI sends a chat turn
    for (source, (tokenizer, model)), cli_text in zip(references.items(), printed, strict=True):
        ids = tokenizer.encode(PROMPT)
        assert results[source]["ids"] == ids, source
        assert results[source]["out"] == _greedy_reference(model.eval(), ids), source
        assert cli_text == _cli_reference(tokenizer, model).strip(), source
