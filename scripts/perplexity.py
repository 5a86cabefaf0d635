"""Perplexity of a text file (or standard input) with hdex_jax, optionally beside transformers' figure.

Scores the text as `model.perplexity` does (lm-evaluation-harness's rolling log-likelihood: the first token
from bos, windows of --window tokens advancing by --stride), with a progress bar on stderr, and prints the
perplexity, the tokens and tokens/s. With --compare, transformers scores the same windows of the same token
ids with its own forward and prints its figure and speed.

    python scripts/perplexity.py FILE|- [--model SmolLM2-135M-Instruct] [--window 512] [--stride 512] [--compare]
"""

from __future__ import annotations

import argparse
import math
import time


def reference_perplexity(model, tokens: list[int], prefix: int, window: int, stride: int) -> tuple[float, float]:
    """(perplexity, seconds) of transformers' forward (`model`, PyTorch) over the same windows."""
    import torch

    from hdex_jax.scoring import rolling_windows

    start = time.perf_counter()
    total = 0.0
    with torch.no_grad():
        for inputs, targets in rolling_windows(tokens, prefix, window, stride):
            logits = model(torch.tensor([inputs])).logits[0, -len(targets):].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            total += float(logprobs.gather(1, torch.tensor(targets)[:, None]).sum())
    return math.exp(-total / len(tokens)), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", help="a text file, or - for standard input")
    parser.add_argument("--model", default=None, help="model id (default: the default model)")
    parser.add_argument("--window", type=int, default=None, help="tokens a pass reads (default: max_length)")
    parser.add_argument("--stride", type=int, default=None, help="new tokens per window (default: the window)")
    parser.add_argument("--max-length", type=int, default=None, help="compile for this max_length")
    parser.add_argument("--compare", action="store_true", help="also score with transformers")
    args = parser.parse_args()

    from hdex_jax import hub
    from hdex_jax.cli import read_text
    from hdex_jax.transformers import AutoModelForCausalLM

    model_id = args.model or hub.DEFAULT_MODEL
    text = read_text(args.file)
    model = AutoModelForCausalLM.from_pretrained(model_id, max_length=args.max_length)
    model.perplexity(text, window=args.window, stride=args.stride)  # compiles its buckets: the timed run is not
    result = model.perplexity(text, window=args.window, stride=args.stride, progress=True)
    print(f"hdex_jax      perplexity {result.perplexity:.4f} over {result.tokens} tokens, "
          f"{result.tokens / result.seconds:.1f} tokens/s")
    if args.compare:
        from bench_decode import reference_model

        reference = reference_model(hub.fetch_checkpoint(model_id)).eval()
        window = args.window or model.max_length
        tokens = model.tokenizer.encode(text, add_special_tokens=False)
        for _ in range(2):  # the first run warms up torch's allocator and threads, as hdex_jax's did its programs
            figure, seconds = reference_perplexity(reference, tokens, model.prefix_token_id, window,
                                                   args.stride or window)
        print(f"transformers  perplexity {figure:.4f} over {len(tokens)} tokens, {len(tokens) / seconds:.1f} "
              f"tokens/s")


if __name__ == "__main__":
    main()
