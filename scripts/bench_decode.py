"""Decode speed of hdex_jax against transformers (PyTorch, CPU) on the same model, prompt and token count.

Runs alternate between the two so that machine noise hits both alike; prints the median tokens/s of each,
their ratio, time to first token, and hdex_jax's compile times. No target: it is an instrument.

    python scripts/bench_decode.py [--model SmolLM2-135M-Instruct] [--new-tokens 64] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path


def _reference_model(source: Path):
    import torch
    import transformers

    kwargs = dict(dtype=torch.float32)
    if source.suffix == ".gguf":
        return transformers.AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, **kwargs)
    return transformers.AutoModelForCausalLM.from_pretrained(source, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model id (default: the default model)")
    parser.add_argument("--prompt", default="The three most important inventions in history are")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()

    import torch

    from hdex_jax import hub
    from hdex_jax.tools import AutoCompiler
    from hdex_jax.transformers import AutoModelForCausalLM

    model_id = args.model or hub.DEFAULT_MODEL
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)

    t0 = time.perf_counter()
    AutoCompiler().compile(model_id, max_length=args.max_length)
    model = AutoModelForCausalLM.from_pretrained(model_id, max_length=args.max_length)
    load_s = time.perf_counter() - t0
    prompt = model.tokenizer.encode(args.prompt)
    n = args.new_tokens
    greedy = dict(do_sample=False, repetition_penalty=1.0, stop=[])

    t0 = time.perf_counter()
    model.generate(prompt, max_new_tokens=n, **greedy)
    first_call_s = time.perf_counter() - t0

    reference = _reference_model(hub.fetch_checkpoint(model_id)).eval()
    ids = torch.tensor([prompt])
    # Timed runs ignore eos so that both sides produce exactly n tokens.
    ref_kwargs = dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)

    ours_s, ref_s, ours_ttft, ref_ttft = [], [], [], []
    with torch.no_grad():
        reference.generate(ids, **ref_kwargs)  # warm-up
        # The correctness check stops at eos on both sides, as generate does by default.
        same = model.generate(prompt, max_new_tokens=n, do_sample=False, repetition_penalty=1.0) == \
            reference.generate(ids, do_sample=False, max_new_tokens=n, pad_token_id=0)[0].tolist()
        for _ in range(args.runs):
            t0 = time.perf_counter()
            model.generate(prompt, max_new_tokens=n, **greedy)
            ours_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            reference.generate(ids, **ref_kwargs)
            ref_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            next(iter(model.generate_yield(prompt, max_new_tokens=n, **greedy)))
            ours_ttft.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            reference.generate(ids, do_sample=False, max_new_tokens=1, pad_token_id=0)
            ref_ttft.append(time.perf_counter() - t0)

    ours_tps = n / statistics.median(ours_s)
    ref_tps = n / statistics.median(ref_s)
    print(f"\nmodel {model_id}, prompt {len(prompt)} tokens, {n} greedy tokens, {args.runs} runs (median), "
          f"{threads} threads")
    print(f"{'':28}{'hdex_jax':>12}{'transformers':>14}")
    print(f"{'tokens/s (whole generate)':28}{ours_tps:12.1f}{ref_tps:14.1f}")
    print(f"{'time to first token (ms)':28}{1e3 * statistics.median(ours_ttft):12.1f}"
          f"{1e3 * statistics.median(ref_ttft):14.1f}")
    print(f"ratio hdex_jax / transformers tokens/s: {ours_tps / ref_tps:.2f}x")
    print(f"hdex_jax compile+load {load_s:.1f}s; first generate, jit compile included, {first_call_s:.1f}s")
    print(f"greedy tokens identical to transformers: {same}")


if __name__ == "__main__":
    main()
