"""How far hdex_jax's scoring logits (`model(ids).logits`, float32) land from transformers' on the same model, by
prompt length, with each set of the prompt pass's XLA options: XLA's own dots (what blocks under
`jitting.YNN_PROMPT_TOKENS` use) and YNNPACK's fusions (what longer blocks use).

Prints, per length and options: the max and mean |logit difference| over every position and the share of logits
more than 1e-4 away. The text is the start of this repository's README.

    python scripts/scoring_parity.py [--model SmolLM2-135M-Instruct] [--lengths 25,100,300,600]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench_decode import reference_model

README = Path(__file__).resolve().parent.parent / "README.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model id (default: the default model)")
    parser.add_argument("--lengths", default="25,100,300,600", help="prompt lengths in tokens")
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]

    import torch

    import hdex_jax.jitting
    from hdex_jax import hub
    from hdex_jax.tools import AutoCompiler
    from hdex_jax.transformers import AutoModelForCausalLM

    model_id = args.model or hub.DEFAULT_MODEL
    max_length = max(lengths) + 1
    AutoCompiler().compile(model_id, max_length=max_length)
    model = AutoModelForCausalLM.from_pretrained(model_id, max_length=max_length)
    reference = reference_model(hub.fetch_checkpoint(model_id)).eval()
    text = model.tokenizer.encode(README.read_text())
    # Every block takes one set of options: the threshold below every length, or above them all.
    options = {"YNNPACK": 0, "XLA dots": max_length + 1}
    print(f"{model_id}: model(ids).logits against transformers float32, one row")
    print(f"{'tokens':>7} {'options':>9} {'max diff':>10} {'mean diff':>10} {'> 1e-4':>9}")
    for n in lengths:
        ids = np.asarray([text[:n]])
        with torch.no_grad():
            theirs = reference(torch.tensor(ids)).logits.numpy()
        for name, threshold in options.items():
            hdex_jax.jitting.YNN_PROMPT_TOKENS = threshold
            diff = np.abs(model(ids).logits - theirs)
            print(f"{n:7d} {name:>9} {diff.max():10.2e} {diff.mean():10.2e} {np.mean(diff > 1e-4):9.1e}")


if __name__ == "__main__":
    main()
