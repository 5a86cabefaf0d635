"""Decode speed of hdex_jax against transformers (PyTorch, CPU) on the same model, prompt and token count.

Runs alternate between the engines so that machine noise hits all alike. Prints, from one run: the median
tokens/s of hdex_jax float32 and transformers and their ratio, time to first token of both, hdex_jax's greedy
against HyperDex's default sampling and full nucleus sampling, bytes read per token (weights + KV cache), the
bandwidth achieved, a memory-bandwidth probe measured in the same run and the share of it reached, compile and
load seconds and peak RSS.

With `--formats`, every hdex_jax format listed (float32 always; `FORMATS`) is compiled, loaded and timed in
the same alternation, next to transformers float32 (and bfloat16 when bfloat16 is listed) and, when
llama-cpp-python is installed (`pip install .[bench]`) and the model is a GGUF, llama.cpp on F32 and F16
copies of the GGUF (written with the `gguf` package) and on the GGUF itself: a table of tokens/s, TTFT,
weight bytes and share of the bandwidth probe, and issue 21's targets. No target is asserted: it is an
instrument. Run it alone on the machine.

    python scripts/bench_decode.py [--model SmolLM2-135M-Instruct] [--new-tokens 128] [--runs 5]
        [--formats float32,float16,bfloat16,int8,int4,auto]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import importlib.util
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


# --formats names: (dtype, quantize) of AutoCompiler.compile.
FORMATS = {"float32": ("float32", None), "float16": ("float16", None), "bfloat16": ("bfloat16", None),
           "int8": ("float32", "int8"), "int4": ("float32", "int4"), "auto": ("float32", "auto")}


def reference_model(source: Path):
    """transformers' float32 model of a checkpoint directory or GGUF file."""
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


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclasses.dataclass
class Engine:
    """One engine in one format, ready to time: `generate` produces the timed tokens (eos ignored), `first_token`
    the first of them."""

    name: str
    generate: Callable[[], object]
    first_token: Callable[[], object]
    weight_bytes: int
    kv_bytes: int = 0  # cache bytes one decode step reads, when known
    cache_slots: int = 0


def gguf_copy(source: Path, target: Path, dtype: str) -> Path:
    """`source`'s metadata and tensors in a GGUF file at `target` whose matrices are `dtype` ("F32" or "F16"),
    dequantized from the source's blocks; vectors stay F32 (llama.cpp's norms are F32)."""
    import gguf

    reader = gguf.GGUFReader(source)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(target, arch)
    for field in reader.fields.values():
        # GGUFWriter writes the architecture and the GGUF.* header fields itself; the file type changes.
        if field.name in (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE) or \
                field.name.startswith("GGUF."):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "F32" else gguf.LlamaFileType.MOSTLY_F16)
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        writer.add_tensor(tensor.name, values.astype(np.float16) if dtype == "F16" and values.ndim > 1 else values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def llama_cpp_engine(name: str, path: Path, prompt: list[int], n: int, n_ctx: int) -> Engine:
    """llama.cpp (llama-cpp-python) on the GGUF at `path`: greedy, 2 threads, eos ignored."""
    import gguf
    import llama_cpp.llama

    # Without llama.cpp's extra buffer types: its AMX buffers crash on Q4_1. Releases whose Llama() does not take
    # use_extra_bufts (0.3.36) still read it from the model parameters they start from.
    defaults = llama_cpp.llama.llama_cpp.llama_model_default_params

    def model_params():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama.llama_cpp.llama_model_default_params = model_params
    try:
        llm = llama_cpp.llama.Llama(str(path), n_ctx=n_ctx, n_threads=2, verbose=False)
    finally:
        llama_cpp.llama.llama_cpp.llama_model_default_params = defaults

    def tokens(count: int) -> None:
        llm.reset()  # else generate reuses the cached prompt and skips the prefill
        for _, _ in zip(range(count), llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0)):
            pass

    weights = sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)
    return Engine(name, lambda: tokens(n), lambda: tokens(1), weights)


def hdex_engine(name: str, model, prompt: list[int], n: int, greedy: dict) -> Engine:
    """A loaded hdex_jax model: `n` greedy tokens of `prompt`."""
    import jax
    import jax.numpy as jnp

    from hdex_jax.generation import plan_generation

    cfg = model.decode.cfg
    # Attention reads every slot of the cache bucket, filled or not: 2 (k, v) x L x KV x S x hd x itemsize.
    cache_slots = plan_generation(len(prompt), n, model.max_length).cache_length
    kv_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cache_slots * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
    return Engine(f"hdex_jax {name}", lambda: model.generate(prompt, max_new_tokens=n, **greedy),
                  lambda: next(iter(model.generate_yield(prompt, max_new_tokens=n, **greedy))),
                  sum(x.nbytes for x in jax.tree.leaves(model.params)), kv_bytes, cache_slots)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model id (default: the default model)")
    parser.add_argument("--prompt", default="The three most important inventions in history are")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--formats", default="float32",
                        help=f"comma-separated hdex_jax formats, of {', '.join(FORMATS)}: float32 is float32 "
                             "unquantized (always run, the reference), int8/int4 float32 with those weights, auto "
                             "the checkpoint's GGUF blocks as stored")
    args = parser.parse_args()
    names = ["float32", *[name for name in args.formats.split(",") if name != "float32"]]
    if unknown := [name for name in names if name not in FORMATS]:
        parser.error(f"--formats: unknown {', '.join(unknown)}; known: {', '.join(FORMATS)}")

    import jax
    import torch

    from hdex_jax import hub
    from hdex_jax.tools import AutoCompiler
    from hdex_jax.transformers import AutoModelForCausalLM

    model_id = args.model or hub.DEFAULT_MODEL
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    n = args.new_tokens
    greedy = dict(do_sample=False, repetition_penalty=1.0, stop=[])
    default = dict(stop=[], seed=0)  # HyperDex's defaults: top_k 1, top_p 0.7, repetition penalty 1.2
    nucleus = dict(do_sample=True, top_k=0, top_p=0.9, repetition_penalty=1.0, stop=[], seed=0)

    # One model directory holds one format: each is compiled, loaded and run once (which loads every program it
    # uses) before the next format replaces the directory.
    engines, setup, models = {}, {}, {}
    for name in names:
        dtype, quantize = FORMATS[name]
        rss_before = _peak_rss_mib()
        compile_s = _timed(lambda: AutoCompiler().compile(model_id, max_length=args.max_length, dtype=dtype,
                                                          quantize=quantize))
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(model_id, max_length=args.max_length)
        load_s = time.perf_counter() - t0
        prompt = model.tokenizer.encode(args.prompt)
        first_call_s = _timed(lambda: model.generate(prompt, max_new_tokens=n, **greedy))
        next(iter(model.generate_yield(prompt, max_new_tokens=n, **greedy)))
        engines[name] = hdex_engine(name, model, prompt, n, greedy)
        setup[name] = (compile_s, load_s, first_call_s, _peak_rss_mib() - rss_before)
        models[name] = model
    model = models["float32"]
    for kwargs in (default, nucleus):
        model.generate(prompt, max_new_tokens=n, **kwargs)  # compiles nothing new: values are runtime inputs
    # Before torch is loaded: its thread pool, still spinning after each of its runs, slows what runs next.
    alone = statistics.median(_timed(engines["float32"].generate) for _ in range(args.runs))

    source = hub.fetch_checkpoint(model_id)
    reference = reference_model(source).eval()
    ids = torch.tensor([prompt])
    # Timed runs ignore eos so that both sides produce exactly n tokens.
    ref_kwargs = dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)

    def torch_engine(name: str, ref) -> Engine:
        return Engine(name, functools.partial(ref.generate, ids, **ref_kwargs),
                      functools.partial(ref.generate, ids, do_sample=False, max_new_tokens=1, pad_token_id=0),
                      sum(p.nbytes for p in ref.parameters()))

    others = [torch_engine("transformers float32", reference)]
    if "bfloat16" in names:
        others.append(torch_engine("transformers bfloat16", copy.deepcopy(reference).to(torch.bfloat16)))
    scratch = tempfile.TemporaryDirectory()
    if importlib.util.find_spec("llama_cpp") is not None and source.suffix == ".gguf":
        for gguf_type in ("F32", "F16"):
            path = gguf_copy(source, Path(scratch.name) / f"{gguf_type}.gguf", gguf_type)
            others.append(llama_cpp_engine(f"llama.cpp {gguf_type}", path, prompt, n, args.max_length))
        # The source file itself: for the default model, Q4_1 layers and a Q8_0 embedding.
        others.append(llama_cpp_engine("llama.cpp GGUF as stored", source, prompt, n, args.max_length))
    else:
        print("llama_cpp is not importable (pip install .[bench]) or the model is not a GGUF: no llama.cpp rows")
    engines.update({engine.name: engine for engine in others})

    times: dict[str, list[float]] = {k: [] for k in ("default", "nucleus")}
    times.update({f"{key} {suffix}": [] for key in engines for suffix in ("tokens", "ttft")})
    with torch.no_grad():
        for engine in others:
            engine.generate()  # warm-up
        # The correctness check stops at eos on both sides, as generate does by default.
        same = model.generate(prompt, max_new_tokens=n, do_sample=False, repetition_penalty=1.0) == \
            reference.generate(ids, do_sample=False, max_new_tokens=n, pad_token_id=0)[0].tolist()
        for _ in range(args.runs):
            for key, engine in engines.items():
                times[f"{key} tokens"].append(_timed(engine.generate))
                times[f"{key} ttft"].append(_timed(engine.first_token))
            times["default"].append(_timed(lambda: model.generate(prompt, max_new_tokens=n, **default)))
            times["nucleus"].append(_timed(lambda: model.generate(prompt, max_new_tokens=n, **nucleus)))
    scratch.cleanup()
    probe = bandwidth_probe()

    median = {k: statistics.median(v) for k, v in times.items()}
    tps = {key: n / median[f"{key} tokens"] for key in engines}
    ttft = {key: median[f"{key} ttft"] for key in engines}
    ours, ref_name = engines["float32"], "transformers float32"
    ours_tps, ref_tps = tps["float32"], tps[ref_name]
    weight_bytes, kv_bytes = ours.weight_bytes, ours.kv_bytes
    per_token = weight_bytes + kv_bytes
    achieved = per_token * ours_tps
    print(f"\nmodel {model_id}, prompt {len(prompt)} tokens, {n} new tokens, {args.runs} alternating runs "
          f"(median), {threads} threads, jax {jax.__version__} on {jax.devices()[0].platform} "
          f"({len(jax.devices())} devices visible), torch {torch.__version__}")
    print(f"{'':34}{'hdex_jax':>12}{'transformers':>14}")
    print(f"{'greedy tokens/s':34}{ours_tps:12.1f}{ref_tps:14.1f}")
    print(f"{'time to first token (ms)':34}{1e3 * ttft['float32']:12.1f}{1e3 * ttft[ref_name]:14.1f}")
    print(f"ratio hdex_jax / transformers tokens/s: {ours_tps / ref_tps:.2f}x")
    print(f"hdex_jax greedy before torch was loaded: {n / alone:.1f} tokens/s "
          f"({per_token * n / alone / probe:.0%} of the bandwidth limit)")
    print(f"default sampling (top_k 1, top_p 0.7, rep 1.2): {n / median['default']:.1f} tokens/s "
          f"= {median['float32 tokens'] / median['default']:.2f} of greedy")
    print(f"nucleus sampling (top_k 0, top_p 0.9): {n / median['nucleus']:.1f} tokens/s "
          f"= {median['float32 tokens'] / median['nucleus']:.2f} of greedy")
    print(f"bytes read per token: {per_token / 1e6:.1f} MB (weights {weight_bytes / 1e6:.1f} MB + KV cache "
          f"{kv_bytes / 1e6:.1f} MB over {ours.cache_slots} slots)")
    print(f"achieved {achieved / 1e9:.1f} GB/s; bandwidth probe (jitted sum over 1 GiB) {probe / 1e9:.1f} GB/s; "
          f"share of the limit {achieved / probe:.0%} (limit {probe / per_token:.1f} tokens/s)")
    for name, (compile_s, load_s, first_call_s, rss) in setup.items():
        print(f"hdex_jax {name}: compile {compile_s:.1f}s, load {load_s:.1f}s, first generate (jit compile "
              f"included) {first_call_s:.1f}s, peak RSS +{rss:.0f} MiB")
    print(f"peak RSS {_peak_rss_mib():.0f} MiB")
    print(f"greedy tokens identical to transformers: {same}")

    print("\n| engine | weights MB/token | decode tok/s | x hdex float32 | TTFT ms | TTFT x hdex float32 "
          "| share of the bandwidth probe |\n|---|---|---|---|---|---|---|")
    for key, engine in engines.items():
        share = (engine.weight_bytes + engine.kv_bytes) * tps[key] / probe
        print(f"| {engine.name} | {engine.weight_bytes / 1e6:.0f} | {tps[key]:.1f} | {tps[key] / ours_tps:.2f} "
              f"| {1e3 * ttft[key]:.1f} | {ttft[key] / ttft['float32']:.2f} | {share:.0%} |")
    targets = [("float16", "float32", 1.8), ("bfloat16", "float32", 1.8), ("float16", "llama.cpp F16", 1.2),
               ("bfloat16", "llama.cpp F16", 1.2), ("int8", "float32", 2.5),
               ("auto", "llama.cpp GGUF as stored", 1.2)]
    print("\nissue 21's targets (tokens/s ratios; TTFT of each format <= hdex float32's):")
    for name, base, target in targets:
        if name in tps and base in tps:
            ratio = tps[name] / tps[base]
            print(f"  hdex {name} / {engines[base].name}: {ratio:.2f}x (target >= {target}x: "
                  f"{'met' if ratio >= target else 'not met'})")
    for name in names[1:]:
        print(f"  TTFT hdex {name} / hdex float32: {ttft[name] / ttft['float32']:.2f} "
              f"({'met' if ttft[name] <= ttft['float32'] else 'not met'})")
    if "auto" in tps:
        share = (engines["auto"].weight_bytes + engines["auto"].kv_bytes) * tps["auto"] / probe
        print(f"  hdex auto share of the bandwidth probe: {share:.0%} (target >= 60%: "
              f"{'met' if share >= 0.6 else 'not met'})")


if __name__ == "__main__":
    main()
