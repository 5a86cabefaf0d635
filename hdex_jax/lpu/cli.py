"""`hdex estimate MODEL --devices 1,2,4,8`: the LPU performance model from the command line.

MODEL needs only a model description, never weights: a Hugging Face config.json (or a directory holding
one), a .gguf file, a compiled model (its directory, or its id: its `hdex_config.json` under
`$HDEX_HOME/hub/<org>/<name>/ckpt/`), or a Hub id whose config.json is in the local Hugging Face cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from hdex_jax.lpu.calibration import CALIBRATION_CONTEXT
from hdex_jax.lpu.config_source import model_config
from hdex_jax.lpu.model import DEFAULT_DTYPE
from hdex_jax.lpu.presets import PRESETS, get_preset
from hdex_jax.lpu.report import format_table, plot_scaling, scaling, write_csv
from hdex_jax.params import total_bytes


def _device_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--devices takes comma-separated integers, got {text!r}") from None


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
    parser.add_argument("--dtype", default=DEFAULT_DTYPE, help=f"weight and KV dtype (default: {DEFAULT_DTYPE})")
    parser.add_argument("--csv", type=Path, default=None, help="also write the table, with every stage, as CSV")
    parser.add_argument("--plot", type=Path, default=None, help="also write a PNG of speedup against devices")
    parser.set_defaults(func=run_estimate)


def run_estimate(args: argparse.Namespace) -> int:
    """Print the scaling table of `args.model`; write CSV and PNG when asked. Returns the exit status; bad input
    raises (TypeError, ValueError, OSError), which `hdex_jax.cli.main` reports."""
    hw = get_preset(args.preset)
    cfg = model_config(args.model, "MODEL")
    context = args.context if args.context is not None else min(CALIBRATION_CONTEXT,
                                                                cfg.max_position_embeddings - 1)
    estimates = scaling(cfg, sorted(set(args.devices)), context, preset=hw, batch=args.batch, dtype=args.dtype)
    weights_gb = total_bytes(dataclasses.replace(cfg, dtype=estimates[0].dtype)) / 1e9
    print(f"{args.model}: {cfg.model_type}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"{weights_gb:.2f} GB of {estimates[0].dtype} weights")
    print(f"preset {hw.name}: {hw.memory_bandwidth_gbs:g} GB/s x {hw.stream_efficiency:.0%} per device, "
          f"{hw.clock_mhz:g} MHz; context {context}, batch {args.batch}")
    print(format_table(estimates))
    too_big = [str(e.num_device) for e in estimates if not e.fits_in_memory]
    if too_big:
        print(f"fits=False: weights and KV cache exceed the {hw.memory_capacity_gb:g} GB of one device on "
              f"{', '.join(too_big)} device(s); shown for comparison only")
    if args.csv is not None:
        write_csv(estimates, args.csv)
        print(f"wrote {args.csv}")
    if args.plot is not None:
        plot_scaling(estimates, args.plot, title=f"{args.model} on {hw.name}, context {context}")
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    from hdex_jax.cli import main

    sys.exit(main())  # `python -m hdex_jax.lpu.cli estimate ...` is `hdex estimate ...`
