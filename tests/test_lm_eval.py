"""lm-evaluation-harness on hdex_jax: the tasks of tests/lm_eval_tasks/ (multiple choice and perplexity, over JSONL
files written here) through real `lm_eval.simple_evaluate` with the `hdex` model give the figures its `hf` model
gives on the same checkpoint, and `generate_until` answers as transformers' greedy generation does."""

import json
import math
from pathlib import Path

import pytest
import torch
import transformers
import yaml

lm_eval = pytest.importorskip("lm_eval")

import hdex_jax.lm_eval_model  # noqa: E402,F401  (registers "hdex")
from hdex_jax.tools import AutoCompiler  # noqa: E402
from tests.helpers_tiny import save_tiny_checkpoint  # noqa: E402

TASKS = Path(__file__).parent / "lm_eval_tasks"
MAX_LENGTH = 64  # both models' max_length (a compile for fewer buckets than the tiny config's 128 positions)
CHOICES = [
    {"question": "The sky is", "choices": [" blue", " green", " the sea"], "answer": 0},
    {"question": "Water in winter is", "choices": [" ice", " hot", " stone"], "answer": 0},
    {"question": "A cat says", "choices": [" woof", " meow"], "answer": 1},
    {"question": "Two and two make", "choices": [" three", " four", " five", " six"], "answer": 1},
    {"question": "The sun sets in the", "choices": [" east", " west"], "answer": 1},
    {"question": "Bread is made of", "choices": [" flour", " glass", " iron"], "answer": 0},
]
TEXTS = [
    {"text": "The quick brown fox jumps over the lazy dog."},
    {"text": "In the beginning there was the word, and it was short."},
    # Longer than MAX_LENGTH tokens: scored in windows by both models.
    {"text": " ".join(["the rain in spain stays mainly in the plain"] * 8)},
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = save_tiny_checkpoint("llama", tmp_path_factory.mktemp("lm_eval") / "tiny-llama")
    AutoCompiler().compile(str(directory), num_device=1, max_length=MAX_LENGTH)
    return directory


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """The repo's task configs, each pointed at a JSONL file of its records."""
    data = tmp_path_factory.mktemp("lm_eval_data")
    configs = []
    for name, records in (("hdex_choice", CHOICES), ("hdex_perplexity", TEXTS)):
        path = data / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        config = yaml.safe_load((TASKS / f"{name}.yaml").read_text())
        config["dataset_kwargs"] = {"data_files": {"test": str(path)}}
        configs.append(config)
    return configs


def evaluate(model, model_args, tasks):
    results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, batch_size=2, device="cpu",
                                      log_samples=False)["results"]
    return {f"{task}/{metric}": value for task, metrics in results.items() for metric, value in metrics.items()
            if isinstance(value, float) and "stderr" not in metric}


def test_figures_equal_those_of_lm_evals_hf_model(checkpoint, tasks):
    ours = evaluate("hdex", f"pretrained={checkpoint},lpu=1", tasks)  # max_length: the compiled one
    theirs = evaluate("hf", f"pretrained={checkpoint},dtype=float32,max_length={MAX_LENGTH}", tasks)
    assert set(ours) == set(theirs) and {"hdex_choice/acc,none", "hdex_perplexity/word_perplexity,none"} <= set(ours)
    for name, value in theirs.items():
        assert math.isfinite(value), name
        assert ours[name] == pytest.approx(value, abs=1e-4, rel=1e-6), name


def test_generate_until_answers_as_transformers_greedy(checkpoint):
    # One row at a time: the programs compiled for batch 1 serve it, nothing traces.
    lm = lm_eval.api.registry.get_model("hdex").create_from_arg_string(f"pretrained={checkpoint},lpu=1,batch_size=1")
    contexts = ["The sky is", "Once upon a time", "A cat"]
    requests = [lm_eval.api.instance.Instance("generate_until", {}, (c, {"until": ["."], "max_gen_toks": 12}), i)
                for i, c in enumerate(contexts)]
    answers = lm.generate_until(requests)
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    for context, answer in zip(contexts, answers):
        ids = tokenizer(context, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, do_sample=False, max_new_tokens=12, eos_token_id=None, pad_token_id=0)
        expected = tokenizer.decode(out[0, ids.shape[1]:]).split(".")[0].split(tokenizer.eos_token)[0]
        assert answer == expected, context
