"""`hdex`: generate text, compile models, list supported families, estimate LPU performance.

Every error, from argument parsing or from the API underneath, is one line `hdex: error: ...` on stderr and
exit status 2, never a traceback. Flags are checked with `hdex_jax.validation` under their own names before
any model is loaded or compiled.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from hdex_jax import artifacts, formats, hub, validation
from hdex_jax.config import DTYPES, ModelConfig
from hdex_jax.tools.compiler import DEFAULT_MAX_LENGTH
from hdex_jax.transformers import modeling

# What a bad input can raise, from the API or the libraries it reads files with; anything else is a bug and
# keeps its traceback.
USER_ERRORS = (ValueError, TypeError, OSError, RuntimeError)


class _Parser(argparse.ArgumentParser):
    """argparse with the one error format of `hdex` (subcommand parsers inherit it)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"hdex: error: {message}\n")


def _generate(args: argparse.Namespace) -> int:
    from hdex_jax.transformers import AutoModelForCausalLM

    if not args.prompt:
        raise ValueError("the prompt is empty: give the text to continue")
    num_device = validation.check_num_device("--num-device", args.num_device)
    kwargs = dict(max_new_tokens=validation.check_max_new_tokens("--max-new-tokens", args.max_new_tokens),
                  do_sample=args.do_sample, top_p=validation.check_top_p("--top-p", args.top_p),
                  top_k=validation.check_top_k("--top-k", args.top_k),
                  repetition_penalty=validation.check_repetition_penalty("--repetition-penalty",
                                                                         args.repetition_penalty),
                  seed=validation.check_seed("--seed", args.seed), temperature=args.temperature)
    if args.do_sample:  # greedy decoding ignores the temperature, as in transformers
        validation.check_temperature("--temperature", args.temperature)
    model = AutoModelForCausalLM.from_pretrained(args.model, device_map={"lpu": num_device})
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer, so hdex generate cannot encode a text prompt; call "
                         f"AutoModelForCausalLM.from_pretrained(...).generate(token_ids) from Python instead")
    if args.raw or not getattr(tokenizer, "chat_template", None):
        ids = tokenizer.encode(args.prompt)
    else:
        # Instruct models answer a chat turn, not raw text: wrap the prompt as the user's message.
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
    # Print the answer as it forms: the decoded text grows by whole characters (a token that ends inside a
    # multi-byte character decodes to U+FFFD until the rest arrives). Needs no transformers import.
    new: list[int] = []
    printed = ""
    for token in model.generate_yield(list(ids), **kwargs):
        new.append(token)
        text = tokenizer.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            print(text[len(printed):], end="", flush=True)
            printed = text
    print(flush=True)
    return 0


def _compile(args: argparse.Namespace) -> int:
    from hdex_jax.tools import AutoCompiler

    AutoCompiler().compile(args.model, num_device=validation.check_num_device("--num-device", args.num_device),
                           max_length=validation.check_max_length("--max-length", args.max_length),
                           low_memory_usage=args.low_memory_usage, fast_compile=not args.full_compile,
                           force=args.force, dtype=args.dtype,
                           quantize=None if args.quantize == "none" else args.quantize)
    return 0


def _models(args: argparse.Namespace) -> int:
    from converters.gguf_arches import ARCHITECTURES
    from converters.gguf_file import SUPPORTED_ARCHITECTURES
    from converters.registry import all_families

    families = all_families()
    if args.markdown:
        print("| model_type | example checkpoint | mechanisms | limits |")
        print("|---|---|---|---|")
        for family in families:
            print(f"| {', '.join(family.model_types)} | `{family.example}` | {'; '.join(family.mechanisms)} | "
                  f"{family.limits or '-'} |")
        return 0
    print("Supported model families (config.json model_type):")
    for family in families:
        print(f"  {', '.join(family.model_types)}  (e.g. {family.example})")
        print(f"      {'; '.join(family.mechanisms)}")
        if family.limits:
            print(f"      limits: {family.limits}")
    print("GGUF architectures (llama.cpp files; Q8_0, Q4_0 and Q4_1 tensors kept as stored, other quantized "
          "types dequantized):")
    for arch in SUPPORTED_ARCHITECTURES:
        limits = ARCHITECTURES[arch].limits
        print(f"  {arch}" + (f"  (limits: {limits})" if limits else ""))
    print(f"Default model: {hub.DEFAULT_MODEL} (GGUF from the PyPI wheel {hub.DEFAULT_WHEEL})")
    compiled = _compiled_models()
    if compiled:
        print(f"Compiled in {hub.hdex_home()}:")
        print("\n".join(f"  {line}" for line in compiled))
    return 0


def _compiled_models() -> list[str]:
    """One line per compiled model and device count: its format and the bytes of its weights."""
    lines = []
    for params_dir in sorted(hub.hdex_home().glob("hub/*/*/param/lpu*")):
        manifest = artifacts.current_manifest(params_dir)
        if manifest is None:
            continue
        stored = ModelConfig.load(artifacts.ckpt_dir(params_dir.parent.parent))
        cfg = formats.from_manifest(stored, manifest)
        size = sum(record["size"] for record in manifest["files"].values()) / 1e6
        lines.append(f"{params_dir.parent.parent.name} on {manifest['num_device']} device(s): "
                     f"{formats.describe(cfg)}; {size:.0f} MB of weights")
    return lines


def build_parser() -> argparse.ArgumentParser:
    from hdex_jax.lpu.cli import add_estimate_parser

    parser = _Parser(prog="hdex", description="HyperDex on emulated LPU devices (JAX).")
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
    gen.add_argument("--seed", type=int, default=0, help="any integer from 0 to 2**64-1 (default: 0)")
    gen.add_argument("--num-device", type=int, default=1,
                     help="emulated LPU devices, from 1 to the devices JAX can provide (default: 1)")
    gen.add_argument("--raw", action="store_true", help="do not wrap the prompt in the model's chat template")
    gen.set_defaults(func=_generate)

    comp = sub.add_parser("compile", help="compile a model for N LPU devices")
    comp.add_argument("model")
    comp.add_argument("--num-device", type=int, default=1,
                      help="LPU devices, from 1 to the devices JAX can provide (default: 1)")
    comp.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH,
                      help=f"longest sequence served (default: {DEFAULT_MAX_LENGTH}, capped at the model's "
                           f"positions)")
    comp.add_argument("--force", action="store_true",
                      help="redo every phase, replacing what an earlier compile wrote (e.g. a corrupted file)")
    comp.add_argument("--low-memory-usage", action="store_true",
                      help="delete the downloaded checkpoint file (in HDEX_HOME/downloads) after conversion")
    comp.add_argument("--full-compile", action="store_true",
                      help="fast_compile=False: export every bucket up to --max-length and XLA-compile each")
    comp.add_argument("--dtype", choices=DTYPES, default="float32",
                      help="activations, KV cache and unquantized weights (default: float32; float16 is the LPU's)")
    comp.add_argument("--quantize", choices=("auto", "none", "int8", "int4"), default="auto",
                      help="auto: a GGUF file's Q8_0/Q4_0/Q4_1 weights as stored; none: every weight in --dtype; "
                           "int8/int4: weight-only quantization of the projections (default: auto)")
    comp.set_defaults(func=_compile)

    models = sub.add_parser("models", help="list the supported model families and their mechanisms")
    models.add_argument("--markdown", action="store_true", help="print the list as a Markdown table")
    models.set_defaults(func=_models)

    add_estimate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"hdex: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
