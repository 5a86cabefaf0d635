"""Decode speed of hdex_jax against transformers (PyTorch, CPU) on the same model, prompt and token count.

Runs alternate between the two so that machine noise hits both alike. Prints, from one run: the median
tokens/s of each and their ratio, time to first token of both, hdex_jax's greedy against HyperDex's default
sampling and full nucleus sampling, bytes read per token (weights + KV cache), the bandwidth achieved, a
memory-bandwidth probe measured in the same run and the share of it reached, compile and load seconds and peak
RSS. No target: it is an instrument. Run it alone on the machine.

    python scripts/bench_decode.py [--model SmolLM2-135M-Instruct] [--new-tokens 128] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import resource
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


def bandwidth_probe(nbytes: int = 1 << 30, repeats: int = 7) -> float:
    """Read bandwidth in bytes/s: the best of `repeats` jitted sums over a float32 array of `nbytes`."""
    import jax
    import jax.numpy as jnp

    data = jnp.ones((nbytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(data).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        total(data).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model id (default: the default model)")
    parser.add_argument("--prompt", default="The three most important inventions in history are")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()

    import jax
    import torch

    from hdex_jax import hub
    from hdex_jax.generation import plan_generation
    from hdex_jax.tools import AutoCompiler
    from hdex_jax.transformers import AutoModelForCausalLM

    model_id = args.model or hub.DEFAULT_MODEL
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)

    compile_s = _timed(lambda: AutoCompiler().compile(model_id, max_length=args.max_length))
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_id, max_length=args.max_length)
    load_s = time.perf_counter() - t0
    prompt = model.tokenizer.encode(args.prompt)
    n = args.new_tokens
    greedy = dict(do_sample=False, repetition_penalty=1.0, stop=[])
    default = dict(stop=[], seed=0)  # HyperDex's defaults: top_k 1, top_p 0.7, repetition penalty 1.2
    nucleus = dict(do_sample=True, top_k=0, top_p=0.9, repetition_penalty=1.0, stop=[], seed=0)
    first_call_s = _timed(lambda: model.generate(prompt, max_new_tokens=n, **greedy))
    for kwargs in (default, nucleus):
        model.generate(prompt, max_new_tokens=n, **kwargs)  # compiles nothing new: values are runtime inputs
    # Before torch is loaded: its thread pool, still spinning after each of its runs, slows what runs next.
    alone = statistics.median(_timed(lambda: model.generate(prompt, max_new_tokens=n, **greedy))
                              for _ in range(args.runs))

    reference = _reference_model(hub.fetch_checkpoint(model_id)).eval()
    ids = torch.tensor([prompt])
    # Timed runs ignore eos so that both sides produce exactly n tokens.
    ref_kwargs = dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)

    times: dict[str, list[float]] = {k: [] for k in ("ours", "ref", "ours_ttft", "ref_ttft", "default", "nucleus")}
    with torch.no_grad():
        reference.generate(ids, **ref_kwargs)  # warm-up
        # The correctness check stops at eos on both sides, as generate does by default.
        same = model.generate(prompt, max_new_tokens=n, do_sample=False, repetition_penalty=1.0) == \
            reference.generate(ids, do_sample=False, max_new_tokens=n, pad_token_id=0)[0].tolist()
        for _ in range(args.runs):
            times["ours"].append(_timed(lambda: model.generate(prompt, max_new_tokens=n, **greedy)))
            times["ref"].append(_timed(lambda: reference.generate(ids, **ref_kwargs)))
            times["ours_ttft"].append(_timed(lambda: next(iter(model.generate_yield(prompt, max_new_tokens=n,
                                                                                     **greedy)))))
            times["ref_ttft"].append(_timed(lambda: reference.generate(ids, do_sample=False, max_new_tokens=1,
                                                                       pad_token_id=0)))
            times["default"].append(_timed(lambda: model.generate(prompt, max_new_tokens=n, **default)))
            times["nucleus"].append(_timed(lambda: model.generate(prompt, max_new_tokens=n, **nucleus)))
    probe = bandwidth_probe()

    median = {k: statistics.median(v) for k, v in times.items()}
    ours_tps, ref_tps = n / median["ours"], n / median["ref"]
    cfg = model.decode.cfg
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(model.params))
    # Attention reads every slot of the cache bucket, filled or not: 2 (k, v) x L x KV x S x hd x 4 bytes.
    cache_slots = plan_generation(len(prompt), n, model.max_length).cache_length
    kv_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cache_slots * cfg.head_dim * 4
    per_token = weight_bytes + kv_bytes
    achieved = per_token * ours_tps
    print(f"\nmodel {model_id}, prompt {len(prompt)} tokens, {n} new tokens, {args.runs} alternating runs "
          f"(median), {threads} threads, jax {jax.__version__} on {jax.devices()[0].platform} "
          f"({len(jax.devices())} devices visible), torch {torch.__version__}")
    print(f"{'':34}{'hdex_jax':>12}{'transformers':>14}")
    print(f"{'greedy tokens/s':34}{ours_tps:12.1f}{ref_tps:14.1f}")
    print(f"{'time to first token (ms)':34}{1e3 * median['ours_ttft']:12.1f}{1e3 * median['ref_ttft']:14.1f}")
    print(f"ratio hdex_jax / transformers tokens/s: {ours_tps / ref_tps:.2f}x")
    print(f"hdex_jax greedy before torch was loaded: {n / alone:.1f} tokens/s "
          f"({per_token * n / alone / probe:.0%} of the bandwidth limit)")
    print(f"default sampling (top_k 1, top_p 0.7, rep 1.2): {n / median['default']:.1f} tokens/s "
          f"= {median['ours'] / median['default']:.2f} of greedy")
    print(f"nucleus sampling (top_k 0, top_p 0.9): {n / median['nucleus']:.1f} tokens/s "
          f"= {median['ours'] / median['nucleus']:.2f} of greedy")
    print(f"bytes read per token: {per_token / 1e6:.1f} MB (weights {weight_bytes / 1e6:.1f} MB + KV cache "
          f"{kv_bytes / 1e6:.1f} MB over {cache_slots} slots)")
    print(f"achieved {achieved / 1e9:.1f} GB/s; bandwidth probe (jitted sum over 1 GiB) {probe / 1e9:.1f} GB/s; "
          f"share of the limit {achieved / probe:.0%} (limit {probe / per_token:.1f} tokens/s)")
    print(f"compile {compile_s:.1f}s, load {load_s:.1f}s, first generate (jit compile included) {first_call_s:.1f}s, "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print(f"greedy tokens identical to transformers: {same}")


if __name__ == "__main__":
    main()
