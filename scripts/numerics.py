"""Numerics of hdex_jax's number formats: each format against float32 without quantization, on one model.

Every format is built in memory from the same converted checkpoint (`converters.load_checkpoint`, then
`formats.compiled_config` + `convert_params`, placed on one device), so all run in one process: float16,
bfloat16, int8 and int4 weights, and the checkpoint's GGUF blocks as stored (quantize="auto", float32). For
each, against hdex_jax float32 with
quantize=None: greedy agreement over PROMPTS x --new-tokens (share of identical sequences, mean position of
the first divergence, --new-tokens when identical; eos does not stop), max and mean |logit - logit_fp32| at the
first step of every prompt, and perplexity on --text (teacher-forced, in rows of --text-row tokens).
transformers in float32, bfloat16 and float16 on the same checkpoint gets the same figures, and hdex_jax's
float32/16-bit formats are also compared with transformers in the same dtype. Prints markdown tables; --out
writes them into a file.

    nice python scripts/numerics.py [--model SmolLM2-135M-Instruct] [--new-tokens 64] [--out docs/numerics.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import sysconfig
from pathlib import Path

import numpy as np

from bench_decode import FORMATS, reference_model

# Varied on purpose: facts, instructions, code, lists, dialogue, numbers, other languages, short and long.
PROMPTS = [
    "The three most important inventions in history are",
    "Once upon a time, in a village at the edge of a forest,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The capital of France is",
    "Here is a recipe for a simple tomato soup:\n1.",
    "Q: What causes the seasons on Earth?\nA:",
    "In 1969, the Apollo 11 mission",
    "SELECT name, COUNT(*) FROM orders",
    "Dear hiring manager, I am writing to apply for",
    "The mitochondria is the powerhouse of the cell because",
    "To install the package, run",
    "Water boils at 100 degrees Celsius at sea level, but on a mountain",
    "Le chat est assis sur",
    "1, 1, 2, 3, 5, 8, 13,",
    "User: Can you recommend a good book about space?\nAssistant:",
    "The main differences between Python and JavaScript are",
    "Photosynthesis converts sunlight, water and carbon dioxide into",
    "Breaking news: scientists have discovered",
    "A haiku about autumn:\n",
    "The function below sorts a list in place using quicksort:\n\n",
    "Climate change affects agriculture in several ways. First,",
    "My favourite thing about weekends is",
    "The theory of relativity, proposed by Albert Einstein,",
    "Step-by-step instructions to change a flat tire:\n",
]
# Python's own LICENSE.txt, shipped with every CPython: a history of Python in prose, then the licenses.
DEFAULT_TEXT = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
TORCH_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass
class Run:
    """What one engine in one format computed."""

    tokens: list[list[int]]  # greedy new tokens of each prompt
    first_logits: np.ndarray  # [prompts, V] float32: logits of the first new token
    nll: np.ndarray  # [rows, T - 1] float64: -log p of each text token after the first of its row
    weight_mb: float | None = None  # bytes of the weights as placed, in MB


def text_rows(tokenizer, path: Path, rows: int, length: int) -> np.ndarray:
    """[rows, length] token ids: the start of the text at `path`, cut into rows."""
    ids = tokenizer.encode(path.read_text(), add_special_tokens=False)
    if len(ids) < rows * length:
        raise ValueError(f"--text {path} has {len(ids)} tokens, fewer than --text-rows x --text-row "
                         f"({rows} x {length})")
    return np.asarray(ids[: rows * length], np.int32).reshape(rows, length)


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target], in float64: logits [..., V], targets [...]."""
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    return log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]


def hdex_run(cfg, flat: dict, prompts: list[list[int]], text: np.ndarray, new_tokens: int, max_length: int) -> Run:
    """hdex_jax in the format of `cfg` (a `formats.compiled_config`) on one device."""
    import jax

    from hdex_jax import formats, runtime
    from hdex_jax.generation import generate_recorded, generate_tokens, place, prepare_batch
    from hdex_jax.kv_cache import init_cache
    from hdex_jax.jitting import decode_step, prefill
    from hdex_jax.sampling import SamplingConfig

    runtime.setup()  # no entry point below: `place` and the programs are called directly
    placed = place(cfg, formats.convert_params(flat, cfg), 1)
    greedy = SamplingConfig(do_sample=False, repetition_penalty=1.0)

    def batch(steps: int):
        return prepare_batch(prompts, max_length=max_length, max_new_tokens=steps, stop=[], pad_id=0, seed=0,
                             sampling=greedy)

    tokens = generate_tokens(placed, batch(new_tokens))
    first = generate_recorded(placed, batch(1)).logits[:, 0]  # [prompts, V]
    # Teacher-forced: the first token of each row as a prompt, then every next token of the text fed in.
    rows, length = text.shape
    run = dict(cfg=placed.cfg, mesh=placed.mesh)
    logits, cache = prefill(placed.params, init_cache(placed.cfg, rows, length), text[:, :1],
                            np.ones((rows, 1), np.int32), **run)  # [rows, V]
    nll = []
    for t in range(1, length):
        nll.append(_nll(np.asarray(logits), text[:, t]))
        if t < length - 1:
            logits, cache = decode_step(placed.params, cache, text[:, t], **run)
    weight_mb = sum(x.nbytes for x in jax.tree.leaves(placed.params)) / 1e6
    return Run(tokens, first, np.stack(nll, 1), weight_mb)


def torch_run(model, prompts: list[list[int]], text: np.ndarray, new_tokens: int) -> Run:
    """transformers' greedy tokens, first logits and text log-likelihoods, one prompt at a time."""
    import torch

    tokens, first = [], []
    with torch.no_grad():
        for prompt in prompts:
            out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new_tokens,
                                 repetition_penalty=1.0, pad_token_id=0, output_logits=True,
                                 return_dict_in_generate=True)
            tokens.append(out.sequences[0, len(prompt):].tolist())
            first.append(out.logits[0][0].float().numpy())
        logits = model(torch.from_numpy(text).long()).logits[:, :-1].float().numpy()  # [rows, T - 1, V]
    return Run(tokens, np.stack(first), _nll(logits, text[:, 1:]))


def compare(run: Run, ref: Run) -> dict[str, float]:
    """The figures of `run` against `ref`."""
    n = len(ref.tokens[0])
    divergence = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), n) for x, y in zip(run.tokens, ref.tokens)]
    diff = np.abs(run.first_logits - ref.first_logits)
    return dict(identical=float(np.mean([d == n for d in divergence])), divergence=float(np.mean(divergence)),
                max_logit=float(diff.max()), mean_logit=float(diff.mean()),
                ppl=float(np.exp(run.nll.mean())), ppl_ref=float(np.exp(ref.nll.mean())))


def table(rows: list[tuple[str, Run, Run]]) -> str:
    """A markdown table of each (name, run, reference) row."""
    lines = ["| format | weights MB | identical greedy sequences | mean first divergence | max abs logit diff "
             "| mean abs logit diff | perplexity | perplexity change |",
             "|---|---|---|---|---|---|---|---|"]
    for name, run, ref in rows:
        c = compare(run, ref)
        size = f"{run.weight_mb:.4g}" if run.weight_mb is not None else ""
        lines.append(f"| {name} | {size} | {c['identical']:.0%} | {c['divergence']:.1f} | {c['max_logit']:.3f} "
                     f"| {c['mean_logit']:.4f} | {c['ppl']:.3f} | {c['ppl'] - c['ppl_ref']:+.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model id (default: the default model)")
    parser.add_argument("--formats", default="float16,bfloat16,int8,int4,auto",
                        help=f"comma-separated, of {', '.join(FORMATS)} (float32 is the reference)")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the built-in prompts")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="text for the perplexity")
    parser.add_argument("--text-rows", type=int, default=4)
    parser.add_argument("--text-row", type=int, default=128, help="tokens per text row")
    parser.add_argument("--out", type=Path, default=None, help="write the tables (markdown) into this file")
    args = parser.parse_args(argv)
    names = args.formats.split(",")
    if unknown := [n for n in names if n not in FORMATS]:
        parser.error(f"--formats: unknown {', '.join(unknown)}; known: {', '.join(FORMATS)}")

    import torch

    import converters
    from hdex_jax import formats, hub

    model_id = args.model or hub.DEFAULT_MODEL
    source = hub.fetch_checkpoint(model_id)
    stored, flat = converters.load_checkpoint(source)  # as stored: a GGUF's blocks stay QuantArrays
    tokenizer = converters.load_tokenizer(source)
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS[: args.prompts]]
    text = text_rows(tokenizer, args.text, args.text_rows, args.text_row)
    max_length = max(map(len, prompts)) + args.new_tokens

    def hdex(name: str) -> Run:
        print(f"[numerics] hdex_jax {name} ...", file=sys.stderr, flush=True)
        cfg = formats.compiled_config(stored, *FORMATS[name])
        return hdex_run(cfg, flat, prompts, text, args.new_tokens, max_length)

    ref = hdex("float32")
    ours = {name: hdex(name) for name in names if name != "float32"}
    theirs = {}
    for dtype in TORCH_DTYPES:
        print(f"[numerics] transformers {dtype} ...", file=sys.stderr, flush=True)
        model = reference_model(source).to(getattr(torch, dtype)).eval()
        model.generation_config.eos_token_id = None  # as hdex_jax's stop=[]: every prompt gets --new-tokens
        theirs[dtype] = torch_run(model, prompts, text, args.new_tokens)

    described = {name: formats.describe(formats.compiled_config(stored, *FORMATS[name]))
                 for name in ["float32", *ours]}
    against_fp32 = [("hdex_jax float32 (the reference)", ref, ref),
                    *[(f"hdex_jax {name} ({described[name]})", run, ref) for name, run in ours.items()],
                    *[(f"transformers {dtype}", run, ref) for dtype, run in theirs.items()]]
    same_dtype = [(f"hdex_jax {name} vs transformers {name}", run, theirs[name])
                  for name, run in [("float32", ref), *ours.items()] if name in theirs]
    header = (f"`python scripts/numerics.py --model {model_id} --new-tokens {args.new_tokens}` on "
              f"{datetime.date.today()}: {len(prompts)} prompts x {args.new_tokens} greedy tokens, first-step "
              f"logits of every prompt, perplexity on {text.size} tokens ({args.text_rows} rows of "
              f"{args.text_row}) of `{args.text}`.")
    report = "\n\n".join([
        header,
        f"Against hdex_jax float32 without quantization ({described['float32']}):",
        table(against_fp32),
        "Against transformers in the same dtype on the same checkpoint (perplexity change against that run):",
        table(same_dtype),
    ])
    print(report)
    if args.out is not None:
        args.out.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
