"""`hdex`: generate text, score text, compile models, list supported families, estimate LPU performance.

Every error, from argument parsing or from the API underneath, is one line `hdex: error: ...` on stderr and
exit status 2, never a traceback. Flags are checked with `hdex_jax.validation` under their own names before
any model is loaded or compiled. `generate` and `score` write only their results on standard output; progress,
notices and compile phases go to standard error, so `hdex generate ... > out.txt` holds the answer alone.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlparse

from hdex_jax import artifacts, formats, hub, sampling, validation
from hdex_jax.config import DTYPES, ModelConfig
from hdex_jax.lpu.cli import add_estimate_parser, run_estimate
from hdex_jax.lpu.config_source import model_config
from hdex_jax.model_store import DEFAULT_MAX_LENGTH, ModelStore
from hdex_jax.tools import AutoCompiler
from hdex_jax.transformers import AutoModelForCausalLM

# What a bad input can raise, from the API or the libraries it reads files with; anything else is a bug and
# keeps its traceback.
USER_ERRORS = (ValueError, TypeError, OSError, RuntimeError)


class _Parser(argparse.ArgumentParser):
    """argparse with the one error format of `hdex` (subcommand parsers inherit it)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"hdex: error: {message}\n")


@contextlib.contextmanager
def _results_only() -> Iterator[Any]:
    """Inside, whatever prints (compile phases, notices) goes to standard error; yields standard output, where
    only results are written."""
    out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        yield out


def _check_hub_reachable(model_id: str) -> None:
    """Fail at once, in one line, when `model_id` would be fetched from the Hugging Face Hub and the Hub cannot
    be reached (huggingface_hub would otherwise retry for about half a minute, logging each retry)."""
    from huggingface_hub import constants

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    store = ModelStore.open(model_id)
    compiled = store.manifest(store.ckpt_dir) is not None
    if not store.source.on_hub or compiled or constants.HF_HUB_OFFLINE:
        return
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=3).close()
    except OSError as err:
        raise OSError(f"{model_id!r} is not a local file or directory, nor compiled here, and the Hugging Face Hub "
                      f"({constants.ENDPOINT}) cannot be reached ({err}); pass a local checkpoint directory or "
                      ".gguf file") from None


def _prompts(args: argparse.Namespace) -> list[str]:
    """Every prompt given: the positional one, each --prompt, each line of --prompts-file; a `|` separates
    several prompts within one (efficient-transformers' form)."""
    given = ([args.prompt] if args.prompt is not None else []) + list(args.prompts or [])
    prompts = [part for text in given for part in text.split("|")]
    if args.prompts_file is not None:
        try:
            lines = Path(args.prompts_file).read_text().splitlines()
        except OSError as err:
            raise OSError(f"--prompts-file {args.prompts_file}: {err.strerror or err}") from None
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError("no prompt: give the text to continue, --prompt TEXT or --prompts-file FILE")
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            which = "the prompt" if len(prompts) == 1 else f"prompt {i + 1} of {len(prompts)}"
            raise ValueError(f"{which} is empty: give the text to continue")
    return prompts


def _generate(args: argparse.Namespace) -> int:
    with _results_only() as out:
        return _generate_to(args, out)


def _generate_to(args: argparse.Namespace, out: Any) -> int:
    prompts = _prompts(args)
    num_device = validation.check_num_device("--num-device", args.num_device)
    kwargs = dict(max_new_tokens=validation.check_max_new_tokens("--max-new-tokens", args.max_new_tokens))
    for setting in sampling.SETTINGS:
        value = getattr(args, setting.name)
        checked = args.do_sample or not setting.when_sampling
        kwargs[setting.name] = setting.check(setting.flag, value) if checked else value
    kwargs["seed"] = validation.check_seed("--seed", args.seed)
    _check_hub_reachable(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, device_map={"lpu": num_device})
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer, so hdex generate cannot encode a text prompt; call "
                         f"AutoModelForCausalLM.from_pretrained(...).generate(token_ids) from Python instead")

    def encode(prompt: str) -> list[int]:
        if args.raw or not getattr(tokenizer, "chat_template", None):
            return list(tokenizer.encode(prompt))
        # Instruct models answer a chat turn, not raw text: wrap the prompt as the user's message.
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))

    ids = [encode(prompt) for prompt in prompts]
    if len(ids) > 1:  # one batch; each answer under its prompt's label
        outputs = model.generate(ids, **kwargs)
        for i, (prompt, row, output) in enumerate(zip(prompts, ids, outputs)):
            print(f"{'' if i == 0 else chr(10)}[{i + 1}] {prompt}", file=out)
            print(tokenizer.decode(output[len(row):], skip_special_tokens=True), file=out, flush=True)
        return 0
    # Print the answer as it forms: the decoded text grows by whole characters (a token that ends inside a
    # multi-byte character decodes to U+FFFD until the rest arrives). Needs no transformers import.
    new: list[int] = []
    printed = ""
    for token in model.generate_yield(ids[0], **kwargs):
        new.append(token)
        text = tokenizer.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            print(text[len(printed):], end="", file=out, flush=True)
            printed = text
    print(file=out, flush=True)
    return 0


def _score(args: argparse.Namespace) -> int:
    with _results_only() as out:
        num_device = validation.check_num_device("--num-device", args.num_device)
        window = None if args.window is None else validation.check_int("--window", args.window, minimum=1)
        stride = None if args.stride is None else validation.check_int("--stride", args.stride, minimum=1)
        text = read_text(args.file)
        _check_hub_reachable(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, device_map={"lpu": num_device})
        result = model.perplexity(text, window=window, stride=stride, progress=True)
        print(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens "
              f"({result.tokens / result.seconds:.1f} tokens/s)", file=out)
    return 0


def read_text(file: str) -> str:
    """The text of `file`, or of standard input for "-"; an error names the file."""
    if file == "-":
        return sys.stdin.read()
    try:
        return Path(file).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise OSError(f"cannot read {file}: {getattr(err, 'strerror', None) or err}") from None


def _compile(args: argparse.Namespace) -> int:
    num_device = validation.check_num_device("--num-device", args.num_device)
    max_length = validation.check_max_length("--max-length", args.max_length)
    _say_what_a_new_max_length_redoes(args.model, num_device, max_length)
    _check_hub_reachable(args.model)
    AutoCompiler().compile(args.model, num_device=num_device, max_length=max_length,
                           low_memory_usage=args.low_memory_usage, fast_compile=not args.full_compile,
                           force=args.force, dtype=args.dtype,
                           quantize=None if args.quantize == "none" else args.quantize)
    return 0


def _say_what_a_new_max_length_redoes(model_id: str, num_device: int, max_length: int) -> None:
    """Before a compile for another max_length than the one compiled, say what it redoes and what it reuses."""
    store = ModelStore.open(model_id)
    compiled = store.compiled_max_length(num_device)
    if compiled is None:
        return
    wanted = store.cap_max_length(max_length, store.config())
    if compiled != wanted:
        print(f"[hdex] {model_id} is compiled for max_length {compiled} on {num_device} device(s); "
              f"compiling for {wanted} exports its programs again (inst/); the converted checkpoint and the "
              f"weights laid out for {num_device} device(s) are reused", file=sys.stderr, flush=True)


def _estimate(args: argparse.Namespace) -> int:
    """`hdex estimate`, its flags checked under their own names first."""
    if not args.devices:
        raise ValueError("--devices is empty: give comma-separated device counts, e.g. 1,2,4,8")
    for count in args.devices:
        validation.check_int("--devices", count, minimum=1)
    validation.check_int("--batch", args.batch, minimum=1)
    if args.context is not None:
        validation.check_int("--context", args.context, minimum=0)
        positions = model_config(args.model, "MODEL").max_position_embeddings
        if args.context >= positions:
            raise ValueError(f"--context {args.context} leaves no position for the new token: {args.model} has "
                             f"{positions} positions; give at most {positions - 1}")
    return run_estimate(args)


def _models(args: argparse.Namespace) -> int:
    from converters.gguf_file import SUPPORTED_ARCHITECTURES
    from converters.registry import GGUF_ARCHITECTURES, all_families

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
        limits = GGUF_ARCHITECTURES[arch].limits
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
    parser = _Parser(prog="hdex", description="HyperDex on emulated LPU devices (JAX).")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="stream generated text (only the answer on standard output)",
                         description="Generate a continuation of each prompt. Several prompts (repeated --prompt, "
                                     "'a|b' or --prompts-file) run as one batch, each answer after a [n] label.")
    gen.add_argument("prompt", nargs="?", help="the text to continue ('|' separates several prompts)")
    gen.add_argument("--prompt", dest="prompts", action="append", metavar="TEXT",
                     help="a prompt; repeat it for several, run as one batch")
    gen.add_argument("--prompts-file", metavar="FILE", help="a file of prompts, one per line, run as one batch")
    gen.add_argument("--model", default=hub.DEFAULT_MODEL,
                     help=f"Hub id, local checkpoint directory or .gguf file (default: {hub.DEFAULT_MODEL})")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per prompt (default: 128)")
    for setting in sampling.SETTINGS:
        help_text = setting.help.format(**sampling.DEFAULTS)
        if isinstance(setting.default, bool):
            gen.add_argument(setting.flag, action="store_true", help=help_text)
        else:
            gen.add_argument(setting.flag, type=type(setting.default), default=setting.default, help=help_text)
    gen.add_argument("--seed", type=int, default=0, help="any integer from 0 to 2**64-1 (default: 0)")
    gen.add_argument("--num-device", type=int, default=1,
                     help="emulated LPU devices, from 1 to the devices JAX can provide (default: 1)")
    gen.add_argument("--raw", action="store_true", help="do not wrap the prompt in the model's chat template")
    gen.set_defaults(func=_generate)

    score = sub.add_parser("score", help="perplexity of a text file (only the result on standard output)")
    score.add_argument("file", metavar="FILE", help="a text file, or - for standard input")
    score.add_argument("--model", default=hub.DEFAULT_MODEL,
                       help=f"Hub id, local checkpoint directory or .gguf file (default: {hub.DEFAULT_MODEL})")
    score.add_argument("--num-device", type=int, default=1,
                       help="emulated LPU devices, from 1 to the devices JAX can provide (default: 1)")
    score.add_argument("--window", type=int, default=None,
                       help="tokens one pass reads (default: the compiled max_length)")
    score.add_argument("--stride", type=int, default=None,
                       help="new tokens scored per window (default: the window, as lm-evaluation-harness)")
    score.set_defaults(func=_score)

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
    sub.choices["estimate"].set_defaults(func=_estimate)
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
