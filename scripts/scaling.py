"""Multi-device scaling on emulated LPU devices: the same tokens for every device count, and what each costs.

For each device count N the model is loaded on N devices; a greedy and a seeded sampled generation must give
exactly the tokens of N=1 (OK / MISMATCH; the script exits with status 1 on any mismatch). Greedy generation
is timed (the median of --runs whole `generate` calls, prompt pass included, after a warm-up that compiles).
Per N it prints and writes to CSV:

- tokens/s on this host, and relative to N=1;
- parameter bytes per device, summed over the weight shards each device holds (`param_bytes_per_device`);
- bytes synchronised per token: the payload per device of the collectives in one decode step, counted from
  the traced program (`hdex_jax.program_stats.sync_bytes_per_token`), not retyped. At N=1 the program still
  holds its psums and all-gather, but over one device they are identities and nothing crosses a link, so the
  synchronised bytes are 0; the "in program" column shows what the program contains at every N.

On one CPU host the N virtual devices share the same cores, so tokens/s does not scale as it would on real
LPUs, where each device streams its own weight shard from its own memory; `hdex estimate` models that.

    python scripts/scaling.py [--model SmolLM2-135M-Instruct] [--devices 1,2,4,8] [--new-tokens 32] [--runs 3]
                              [--csv scaling.csv]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import os
import statistics
import sys
import time

SAMPLING = dict(do_sample=True, top_k=50, top_p=0.9, temperature=0.8, seed=0)
# No repetition penalty and no stop token, so every device count produces exactly --new-tokens tokens.
COMMON = dict(repetition_penalty=1.0, stop=[])


@dataclasses.dataclass(frozen=True)
class Row:
    num_device: int
    tokens_per_s: float
    relative_to_1: float
    param_bytes_per_device: int
    sync_bytes_per_token: int  # across devices: 0 at N=1
    program_sync_bytes_per_token: int  # the collectives' payload as traced, identities included
    greedy_identical: bool
    sampled_identical: bool


def _device_counts(text: str) -> list[int]:
    counts = sorted({int(part) for part in text.split(",") if part.strip()} | {1})
    if counts[0] < 1:
        raise argparse.ArgumentTypeError(f"device counts must be positive integers, got {text!r}")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model id (default: the default model)")
    parser.add_argument("--devices", type=_device_counts, default=[1, 2, 4, 8],
                        help="comma-separated device counts; N=1 always runs, as the reference")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt", default="The three most important inventions in history are")
    parser.add_argument("--csv", default="scaling.csv", help="where to write the table")
    parser.add_argument("--max-length", type=int, default=256, help="max_length to compile for")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per device count (median)")
    args = parser.parse_args()

    # Imported here so that --help is quick; hdex_jax must come before anything else starts JAX.
    from hdex_jax import hub
    from hdex_jax.program_stats import param_bytes_per_device, sync_bytes_per_token
    from hdex_jax.transformers import AutoModelForCausalLM

    model_id = args.model or hub.DEFAULT_MODEL
    n = args.new_tokens
    reference: dict[str, list[int]] = {}
    rows: list[Row] = []
    for num_device in args.devices:
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(model_id, device_map={"lpu": num_device},
                                                     max_length=args.max_length)
        prompt = model.tokenizer.encode(args.prompt)
        # The first calls compile; they are the warm-up and give the tokens to compare.
        greedy = model.generate(prompt, max_new_tokens=n, do_sample=False, **COMMON)
        sampled = model.generate(prompt, max_new_tokens=n, **SAMPLING, **COMMON)
        print(f"[scaling] N={num_device}: loaded and compiled in {time.perf_counter() - t0:.1f}s", flush=True)
        reference.setdefault("greedy", greedy)
        reference.setdefault("sampled", sampled)

        seconds = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            model.generate(prompt, max_new_tokens=n, do_sample=False, **COMMON)
            seconds.append(time.perf_counter() - t0)
        tokens_per_s = n / statistics.median(seconds)
        sync = sync_bytes_per_token(model)
        rows.append(Row(num_device, tokens_per_s, tokens_per_s / (rows[0].tokens_per_s if rows else tokens_per_s),
                        param_bytes_per_device(model.params), sync.across_devices, sync.total,
                        greedy == reference["greedy"], sampled == reference["sampled"]))
        del model
        gc.collect()  # free this placement's weights before the next one is loaded

    print(f"\nmodel {model_id}, prompt {len(prompt)} tokens, {n} new tokens, median of {args.runs} runs, "
          f"{os.cpu_count()} host cores shared by all virtual devices")
    print(f"{'N':>3}{'tokens/s':>10}{'vs N=1':>8}{'params/device MB':>18}{'sync KB/token':>15}"
          f"{'(in program)':>14}  greedy / sampled vs N=1")
    for r in rows:
        verdict = " / ".join("OK" if same else "MISMATCH" for same in (r.greedy_identical, r.sampled_identical))
        print(f"{r.num_device:>3}{r.tokens_per_s:>10.1f}{r.relative_to_1:>7.2f}x{r.param_bytes_per_device / 1e6:>18.1f}"
              f"{r.sync_bytes_per_token / 1e3:>15.2f}{r.program_sync_bytes_per_token / 1e3:>14.2f}  {verdict}")
    print("MB = 10^6 bytes, KB = 10^3 bytes.\n"
          "sync: payload per device of one decode step's collectives (psum operands, all-gather results), counted\n"
          "  from the traced program; at N=1 they are identities over one device and nothing crosses a link.\n"
          "tokens/s: all virtual devices share this host's cores; `hdex estimate` models real LPU devices.")

    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[field.name for field in dataclasses.fields(Row)])
        writer.writeheader()
        writer.writerows(dataclasses.asdict(r) for r in rows)
    print(f"wrote {args.csv}")
    if not all(r.greedy_identical and r.sampled_identical for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
