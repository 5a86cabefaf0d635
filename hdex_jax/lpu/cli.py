"""`hdex estimate MODEL --devices 1,2,4,8`: the LPU performance model from the command line.

MODEL needs only a model description, never weights: a Hugging Face config.json (or a directory holding
one), a .gguf file, a compiled model (its directory, or its id: its `hdex_config.json` under
`$HDEX_HOME/hub/<org>/<name>/ckpt/`), or a Hub id whose config.json is in the local Hugging Face cache.

`--compare h100,l4` adds the same decode step on as many GPUs, with J/token and the LPU's speedup and energy
efficiency over each; `--prompt P --output O` adds a whole generation: on LPUs, on GPUs, and the hybrid
(GPU prefill, LPU decode).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hdex_jax.lpu.calibration import CALIBRATION_CONTEXT
from hdex_jax.lpu.config_source import compiled_format, model_config
from hdex_jax.lpu.formats import DEFAULT_DTYPE, QUANTIZED, storage
from hdex_jax.lpu.presets import GPU_PRESETS, PRESETS, get_gpu, get_preset
from hdex_jax.lpu.report import (compare, end_to_end_table, format_comparison, format_end_to_end, format_table,
                                 plot_comparison, plot_scaling, scaling, write_csv)


def _device_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--devices takes comma-separated integers, got {text!r}") from None


def _gpu_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"--compare takes comma-separated GPU presets ({', '.join(GPU_PRESETS)})")
    return names


def add_estimate_parser(subparsers: Any) -> None:
    """Add the `estimate` subcommand to an argparse subparsers object (its handler is `run_estimate`)."""
    parser = subparsers.add_parser(
        "estimate", help="estimate ms/token of a model on N LPU devices (needs only its config)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL", help="config.json, model directory, .gguf, or model id")
    parser.add_argument("--devices", type=_device_list, default=[1, 2, 4, 8],
                        help="comma-separated device counts (default: 1,2,4,8)")
    parser.add_argument("--preset", default="asic", help=f"hardware preset: {', '.join(PRESETS)} (default: asic)")
    parser.add_argument("--context", type=int, default=None,
                        help=f"tokens already in the KV cache (default: {CALIBRATION_CONTEXT}, the calibration "
                             "context, or the model's last position if smaller)")
    parser.add_argument("--batch", type=int, default=1, help="rows decoded together (default: 1)")
    parser.add_argument("--dtype", default=None,
                        help=f"activation, KV and weight dtype, or a quantized format (default: a compiled model's "
                             f"own format, else {DEFAULT_DTYPE})")
    parser.add_argument("--quantize", default=None, choices=QUANTIZED,
                        help="format of the matrices (default: a compiled model's own format, else none)")
    parser.add_argument("--compare", type=_gpu_list, default=None, metavar="GPUS",
                        help=f"GPU presets to set beside the LPU, e.g. h100,l4 (known: {', '.join(GPU_PRESETS)})")
    parser.add_argument("--prompt", type=int, default=None, help="prompt length of a generation to cost end to end")
    parser.add_argument("--output", type=int, default=None, help="output length of that generation")
    parser.add_argument("--csv", type=Path, default=None, help="also write the table, with every stage, as CSV")
    parser.add_argument("--plot", type=Path, default=None,
                        help="also write a PNG: speedup against devices, or with --compare ms/token and J/token of "
                             "the LPU and each GPU")
    parser.set_defaults(func=run_estimate)


def run_estimate(args: argparse.Namespace) -> int:
    """Print the scaling table of `args.model`; write CSV and PNG when asked. Returns the exit status; bad input
    raises (TypeError, ValueError, OSError), which `hdex_jax.cli.main` reports."""
    hw = get_preset(args.preset)
    gpus = [get_gpu(name) for name in args.compare or ()]
    dtype, quantize = args.dtype, args.quantize
    compiled = compiled_format(args.model, "MODEL") if dtype is None and quantize is None else None
    if compiled is not None:
        dtype, quantize = compiled
        print(f"{args.model}: the format it was compiled in ({dtype}"
              f"{f', matrices {quantize}' if quantize else ''}); --dtype/--quantize choose another")
    store = storage(dtype or DEFAULT_DTYPE, quantize, dtype_name="--dtype", quantize_name="--quantize")
    if (args.prompt is None) != (args.output is None):
        raise ValueError("--prompt and --output go together: give both to cost a generation end to end")
    cfg = model_config(args.model, "MODEL")
    context = args.context if args.context is not None else min(CALIBRATION_CONTEXT,
                                                                cfg.max_position_embeddings - 1)
    devices = sorted(set(args.devices))
    step = {"batch": args.batch, "dtype": store.dtype, "quantize": store.quantize}
    estimates = scaling(cfg, devices, context, preset=hw, **step)
    print(f"{args.model}: {cfg.model_type}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"{estimates[0].weight_bytes / 1e9:.2f} GB of {store.name} weights")
    print(f"preset {hw.name}: {hw.memory_bandwidth_gbs:g} GB/s x {hw.stream_efficiency:.0%} per device, "
          f"{hw.clock_mhz:g} MHz; context {context}, batch {args.batch}")
    print(format_table(estimates))
    too_big = [str(e.num_device) for e in estimates if not e.fits_in_memory]
    if too_big:
        print(f"fits=False: weights and KV cache exceed the {hw.memory_capacity_gb:g} GB of one device on "
              f"{', '.join(too_big)} device(s); shown for comparison only")
    comparisons = None
    if gpus:
        comparisons = compare(cfg, devices, context, preset=hw, gpus=gpus, **step)
        print(f"\nLPU ({hw.name}) beside {', '.join(g.name for g in gpus)} on as many devices; J/token at the wall "
              f"of the server (docs/lpu_performance_model.md, energy):")
        print(format_comparison(comparisons))
    if args.prompt is not None:
        gpu = gpus[0] if gpus else get_gpu("h100")
        print(f"\ngeneration of {args.output} tokens from a {args.prompt}-token prompt (hybrid: prefill on "
              f"{gpu.name}, decode on {hw.name}):")
        print(format_end_to_end(end_to_end_table(cfg, devices, args.prompt, args.output, preset=hw, gpu=gpu,
                                                 dtype=store.dtype, quantize=store.quantize)))
    if args.csv is not None:
        write_csv(estimates, args.csv)
        print(f"wrote {args.csv}")
    if args.plot is not None:
        title = f"{args.model} on {hw.name}, context {context}"
        if comparisons:
            plot_comparison(comparisons, args.plot, title=title)
        else:
            plot_scaling(estimates, args.plot, title=title)
        print(f"wrote {args.plot}")
    return 0
