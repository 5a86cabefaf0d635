"""Prompt-pass speed of hdex_jax against transformers' forward (PyTorch, CPU) on the same model and tokens.

For each prompt length: time to first token of `generate(..., max_new_tokens=1)` (prefill and one sampled
token) and the scoring pass `model(ids).logits` (logits of every position), against transformers' forward
over the same ids, runs alternating so that machine noise hits both alike. Prints tokens/s of each, the ratio
and the GFLOP/s achieved (2 x parameters x tokens, plus attention's 4 x layers x hidden x T^2 / 2 causal).
Run it alone on the machine.

    python scripts/bench_prefill.py [--model SmolLM2-135M-Instruct] [--lengths 64,256,512,2048] [--runs 5]
        [--format auto]

`--format` is one of bench_decode's `FORMATS` (the default model's `auto` keeps its GGUF blocks, which XLA's
products of a long prompt dequantize inside the program; `float32` stores float32 weights like transformers').
"""

from __future__ import annotations

import argparse
import os
import statistics

from bench_decode import FORMATS, reference_model, _timed


def forward_flops(cfg, params: int, tokens: int) -> float:
    """Multiply-adds x 2 of a causal forward over `tokens`: the weights once per token, and attention's scores
    and weighted sum over the tokens before each."""
    return 2 * params * tokens + 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * tokens * tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model id (default: the default model)")
    parser.add_argument("--lengths", default="64,256,512,2048", help="prompt lengths in tokens")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--format", default="auto", choices=list(FORMATS), help="number format of hdex_jax's weights")
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]

    import jax
    import numpy as np
    import torch

    from hdex_jax import hub
    from hdex_jax.tools import AutoCompiler
    from hdex_jax.transformers import AutoModelForCausalLM

    model_id = args.model or hub.DEFAULT_MODEL
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    max_length = max(lengths) + 1
    dtype, quantize = FORMATS[args.format]
    AutoCompiler().compile(model_id, max_length=max_length, dtype=dtype, quantize=quantize)
    model = AutoModelForCausalLM.from_pretrained(model_id, max_length=max_length)
    reference = reference_model(hub.fetch_checkpoint(model_id)).eval()
    params = sum(p.numel() for p in reference.parameters() if p.ndim > 1)
    cfg = model.config
    rng = np.random.default_rng(0)
    print(f"model {model_id} ({args.format}), {args.runs} alternating runs (median), {threads} threads, "
          f"jax {jax.__version__}, torch {torch.__version__}")
    print(f"{'tokens':>7}{'pass':>10}{'hdex tok/s':>12}{'hf tok/s':>10}{'ratio':>7}{'hdex GFLOP/s':>14}"
          f"{'hf GFLOP/s':>12}")
    for n in lengths:
        ids = rng.integers(3, cfg.vocab_size, size=(1, n))
        prompt = ids[0].tolist()
        tensor = torch.tensor(ids)
        first = dict(max_new_tokens=1, do_sample=False, repetition_penalty=1.0, stop=[])
        model.generate(prompt, **first)  # compiles (not timed)
        model(ids)
        times: dict[str, list[float]] = {"ttft": [], "score": [], "ref": []}
        with torch.no_grad():
            reference(tensor)
            for _ in range(args.runs):
                times["ttft"].append(_timed(lambda: model.generate(prompt, **first)))
                times["score"].append(_timed(lambda: model(ids)))
                times["ref"].append(_timed(lambda: reference(tensor)))
        median = {k: statistics.median(v) for k, v in times.items()}
        flops = forward_flops(cfg, params, n)
        for name in ("ttft", "score"):
            print(f"{n:7d}{name:>10}{n / median[name]:12.0f}{n / median['ref']:10.0f}"
                  f"{median['ref'] / median[name]:7.2f}{flops / median[name] / 1e9:14.1f}"
                  f"{flops / median['ref'] / 1e9:12.1f}")


if __name__ == "__main__":
    main()
