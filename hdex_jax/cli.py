"""`hdex`: generate text, compile models, list supported families, estimate LPU performance."""

from __future__ import annotations

import argparse
import os
import sys

# Without torch, importing transformers advises that "Models won't be available"; hdex_jax's models run on JAX
# and use only transformers' tokenizers, so that advice would only mislead. Set before transformers is imported.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from hdex_jax import hub  # noqa: E402  (after the environment above)
from hdex_jax.transformers import modeling  # noqa: E402


def _generate(args: argparse.Namespace) -> int:
    from hdex_jax.transformers import AutoModelForCausalLM, TextStreamer

    model = AutoModelForCausalLM.from_pretrained(args.model, device_map={"lpu": args.num_device})
    tokenizer = model.tokenizer
    if args.raw or not getattr(tokenizer, "chat_template", None):
        ids = tokenizer.encode(args.prompt)
    else:
        # Instruct models answer a chat turn, not raw text: wrap the prompt as the user's message.
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    model.generate(list(ids), max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, top_p=args.top_p,
                   top_k=args.top_k, temperature=args.temperature, repetition_penalty=args.repetition_penalty,
                   seed=args.seed, streamer=streamer)
    return 0


def _compile(args: argparse.Namespace) -> int:
    from hdex_jax.tools import AutoCompiler

    AutoCompiler().compile(args.model, num_device=args.num_device, max_length=args.max_length)
    return 0


def _models(args: argparse.Namespace) -> int:
    import converters

    print("Supported model families (config.json model_type, or GGUF architecture 'llama'):")
    for model_type in converters.SUPPORTED_MODEL_TYPES:
        print(f"  {model_type}")
    print(f"Default model: {hub.DEFAULT_MODEL} (GGUF from the PyPI wheel {hub.DEFAULT_WHEEL})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from hdex_jax.lpu.cli import add_estimate_parser

    parser = argparse.ArgumentParser(prog="hdex", description="HyperDex on emulated LPU devices (JAX).")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="stream generated text")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=hub.DEFAULT_MODEL,
                     help=f"Hub id, local checkpoint directory or .gguf file (default: {hub.DEFAULT_MODEL})")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--top-p", type=float, default=modeling.DEFAULT_TOP_P)
    gen.add_argument("--top-k", type=int, default=modeling.DEFAULT_TOP_K)
    gen.add_argument("--temperature", type=float, default=modeling.DEFAULT_TEMPERATURE)
    gen.add_argument("--repetition-penalty", type=float, default=modeling.DEFAULT_REPETITION_PENALTY)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--num-device", type=int, default=1, help="emulated LPU devices")
    gen.add_argument("--raw", action="store_true", help="do not wrap the prompt in the model's chat template")
    gen.set_defaults(func=_generate)

    comp = sub.add_parser("compile", help="compile a model for N LPU devices")
    comp.add_argument("model")
    comp.add_argument("--num-device", type=int, default=1)
    comp.add_argument("--max-length", type=int, default=4096)
    comp.set_defaults(func=_compile)

    models = sub.add_parser("models", help="list the supported model families")
    models.set_defaults(func=_models)

    add_estimate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"hdex: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
