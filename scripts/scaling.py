"""Multi-device scaling experiment on emulated LPU devices: a grid over models x device counts x context lengths.

For each grid point (model, N devices, context length C) the model is loaded on N devices and given a prompt of
exactly C tokens; the script measures and writes one CSV row:

- tokens/s on this host: --new-tokens divided by the median of --runs whole greedy `generate` calls (prompt pass
  included), after a warm-up call that compiles;
- parameter bytes per device, summed over the weight shards each device holds (`param_bytes_per_device`);
- bytes synchronised per token: the payload per device of the collectives in one decode step, counted from the
  traced program (`sync_bytes_per_token`). At N=1 the program still holds its psums and all-gather, but over one
  device they are identities, so the synchronised bytes are 0; `program_sync_bytes_per_token` shows what the
  program contains at every N;
- the modeled LPU ms/token of the same model, N and mean context (C + half the new tokens), from
  `hdex_jax.lpu.estimate` with --preset;
- short hashes of the greedy and of a seeded sampled generation's tokens. Every N must give N=1's tokens for the
  same model and context; the final table says OK or MISMATCH, and the script exits with status 1 on a mismatch.

The CSV is the experiment's record and its checkpoint: each row is appended and flushed to disk as soon as its
point is measured, with one write, so an interrupted grid leaves only whole rows (a torn last line, from a crash
inside that write, is dropped on the next start). Rerunning with the same --csv skips every point it already
holds (same model, N, context and --new-tokens) and computes only the missing ones. The plot (--plot) is drawn
from all the CSV's rows of the current grid.

On one CPU host the N virtual devices share the same cores and memory bandwidth, so tokens/s does not scale as on
real LPUs, where each device streams its own weight shard from its own memory; the lpu_ms_per_token column models
that.

    python scripts/scaling.py [--models SmolLM2-135M-Instruct,other] [--devices 1,2,4,8] [--contexts 128,512]
                              [--new-tokens 32] [--runs 3] [--csv scaling.csv] [--plot scaling.png]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import hashlib
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

SAMPLING = {"do_sample": True, "top_k": 50, "top_p": 0.9, "temperature": 0.8, "seed": 0}
# No repetition penalty and no stop token, so every point produces exactly --new-tokens tokens.
COMMON = {"repetition_penalty": 1.0, "stop": []}
# The text a prompt of C tokens is cut from (repeated as often as C needs).
PROMPT_TEXT = "The three most important inventions in history are the wheel, the printing press and the transistor. "


@dataclasses.dataclass(frozen=True)
class Point:
    """One grid point: what is measured."""

    model: str
    num_device: int
    context_len: int
    new_tokens: int


@dataclasses.dataclass(frozen=True)
class Row:
    """One CSV row: a grid point and its measurements."""

    model: str
    num_device: int
    context_len: int
    new_tokens: int
    tokens_per_s: float
    param_bytes_per_device: int
    sync_bytes_per_token: int  # across devices: 0 at N=1
    program_sync_bytes_per_token: int  # the collectives' payload as traced, identities included
    lpu_ms_per_token: float  # the performance model at the mean context
    greedy_tokens: str  # hash of the greedy tokens, compared across N
    sampled_tokens: str  # hash of the seeded sampled tokens, compared across N

    @property
    def point(self) -> Point:
        return Point(self.model, self.num_device, self.context_len, self.new_tokens)


FIELDS = [field.name for field in dataclasses.fields(Row)]


def _int_list(text: str) -> list[int]:
    """A comma-separated list of positive integers, sorted and without repeats."""
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected at least one model id")
    return names


def grid(models: Sequence[str], devices: Sequence[int], contexts: Sequence[int], new_tokens: int) -> list[Point]:
    """Every point, ordered so that one loaded placement (model, N) serves all its contexts in a row."""
    return [Point(m, n, c, new_tokens) for m in models for n in devices for c in contexts]


def _row_from_csv(record: dict[str, str]) -> Row:
    types = {field.name: field.type for field in dataclasses.fields(Row)}
    convert = {"int": int, "float": float, "str": str}
    return Row(**{name: convert[types[name]](record[name]) for name in FIELDS})


def read_rows(path: Path) -> list[Row]:
    """The whole rows of the CSV at `path` ([] if it does not exist). A torn last line (no newline: the process
    died inside its write) is cut off the file, so that the next append starts on a fresh line."""
    if not path.exists():
        return []
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)  # atomic: the file is either the old one or the repaired one
    if not text:
        return []
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames != FIELDS:
        raise SystemExit(f"{path} has columns {reader.fieldnames}, not this script's {FIELDS}; "
                         f"give another --csv")
    return [_row_from_csv(record) for record in reader]


def _csv_line(values: Iterable[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


def append_row(path: Path, row: Row) -> None:
    """Append `row` (and the header first, into an empty file) with a single write, then fsync: a crash leaves
    either the whole row or, at worst, a torn last line that `read_rows` removes."""
    text = _csv_line(dataclasses.asdict(row).values())
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size == 0:
            text = _csv_line(FIELDS) + text
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _token_hash(tokens: Sequence[int]) -> str:
    return hashlib.sha256(json.dumps(list(tokens)).encode()).hexdigest()[:16]


def measure(model: Any, point: Point, runs: int, preset: str) -> Row:
    """Measure `point` on `model` (already loaded on point.num_device devices)."""
    from hdex_jax.lpu import estimate
    from hdex_jax.lpu.program_stats import param_bytes_per_device, sync_bytes_per_token

    text_ids = model.tokenizer.encode(PROMPT_TEXT)
    prompt = (text_ids * (point.context_len // len(text_ids) + 1))[:point.context_len]
    n = point.new_tokens
    # The first calls compile (this prompt-length bucket); they are the warm-up and give the tokens to compare.
    greedy = model.generate(prompt, max_new_tokens=n, do_sample=False, **COMMON)
    sampled = model.generate(prompt, max_new_tokens=n, **SAMPLING, **COMMON)
    seconds = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, do_sample=False, **COMMON)
        seconds.append(time.perf_counter() - t0)
    sync = sync_bytes_per_token(model)
    lpu = estimate(model.config, point.num_device, point.context_len + n // 2, preset=preset)
    return Row(point.model, point.num_device, point.context_len, n, n / statistics.median(seconds),
               param_bytes_per_device(model.params), sync.across_devices, sync.total, lpu.ms_per_token,
               _token_hash(greedy), _token_hash(sampled))


def run_grid(points: Sequence[Point], csv_path: Path, load: Callable[[str, int], Any],
             measure_point: Callable[[Any, Point], Row]) -> list[Point]:
    """Measure every point the CSV does not hold yet, appending each row as soon as it is measured.

    `load(model_id, num_device)` gives a loaded model; it is called once per (model, N) with pending points.
    Returns the points computed in this call.
    """
    from tqdm import tqdm

    done = {row.point for row in read_rows(csv_path)}
    pending = [p for p in points if p not in done]
    print(f"[scaling] {len(points)} grid points, {len(points) - len(pending)} already in {csv_path}, "
          f"{len(pending)} to compute", flush=True)
    model, placement = None, None
    with tqdm(pending, desc="scaling", unit="point") as bar:
        for point in bar:
            bar.set_postfix_str(f"{point.model} N={point.num_device} C={point.context_len}")
            if placement != (point.model, point.num_device):
                model = None
                gc.collect()  # free the previous placement's weights before the next one is loaded
                model, placement = load(point.model, point.num_device), (point.model, point.num_device)
            append_row(csv_path, measure_point(model, point))
    return pending


def report(rows: Sequence[Row]) -> bool:
    """Print the table of `rows`; True when every N gives N=1's tokens (for the same model and context)."""
    reference = {(r.model, r.context_len): (r.greedy_tokens, r.sampled_tokens) for r in rows if r.num_device == 1}
    all_same = True
    print(f"\n{'model':<28}{'C':>6}{'N':>3}{'tokens/s':>10}{'params/device MB':>18}{'sync KB/token':>15}"
          f"{'(in program)':>14}{'LPU ms/token':>14}  greedy / sampled vs N=1")
    for r in sorted(rows, key=lambda r: (r.model, r.context_len, r.num_device)):
        ref = reference.get((r.model, r.context_len))
        if ref is None:
            verdict = "no N=1 row"
        else:
            same = (r.greedy_tokens == ref[0], r.sampled_tokens == ref[1])
            all_same &= all(same)
            verdict = " / ".join("OK" if s else "MISMATCH" for s in same)
        print(f"{r.model[-28:]:<28}{r.context_len:>6}{r.num_device:>3}{r.tokens_per_s:>10.1f}"
              f"{r.param_bytes_per_device / 1e6:>18.1f}{r.sync_bytes_per_token / 1e3:>15.2f}"
              f"{r.program_sync_bytes_per_token / 1e3:>14.2f}{r.lpu_ms_per_token:>14.3f}  {verdict}")
    print(f"MB = 10^6 bytes, KB = 10^3 bytes. tokens/s: all virtual devices share this host's {os.cpu_count()} cores;\n"
          "LPU ms/token: the performance model (hdex_jax.lpu.estimate) at the mean context.")
    return all_same


def plot(rows: Sequence[Row], path: Path) -> None:
    """Emulator tokens/s and modeled LPU ms/token against N, one line per (model, context)."""
    import matplotlib

    matplotlib.use("Agg")  # a script: write a file, never open a window
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[tuple[str, int], list[Row]] = {}
    for r in sorted(rows, key=lambda r: r.num_device):
        series.setdefault((r.model, r.context_len), []).append(r)
    for (model, context), line in sorted(series.items()):
        label = f"{Path(model).name} C={context}"
        ns = [r.num_device for r in line]
        left.plot(ns, [r.tokens_per_s for r in line], marker="o", label=label)
        right.plot(ns, [r.lpu_ms_per_token for r in line], marker="o", label=label)
    devices = sorted({r.num_device for r in rows})
    for ax, ylabel, title in ((left, "tokens/s", f"emulator on {os.cpu_count()} shared CPU cores"),
                              (right, "ms/token", "modeled LPU")):
        ax.set_xscale("log", base=2)
        ax.set(xticks=devices, xticklabels=devices, xlabel="devices N", ylabel=ylabel, title=title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the grid; returns the exit status (1 if some N gave other tokens than N=1)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=_name_list, default=None,
                        help="comma-separated model ids (default: the default model)")
    parser.add_argument("--devices", type=_int_list, default=[1, 2, 4, 8],
                        help="comma-separated device counts; N=1 is always added, as the reference")
    parser.add_argument("--contexts", type=_int_list, default=[128, 512],
                        help="comma-separated prompt lengths in tokens")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per point (median)")
    parser.add_argument("--preset", default="asic", help="LPU preset of the performance model (asic, fpga-u55c)")
    parser.add_argument("--csv", type=Path, default=Path("scaling.csv"), help="the table, appended row by row")
    parser.add_argument("--plot", type=Path, default=Path("scaling.png"), help="where to draw the plot")
    args = parser.parse_args(argv)
    if args.new_tokens < 1 or args.runs < 1:
        parser.error("--new-tokens and --runs must be at least 1")

    # Imported here so that --help is quick; hdex_jax must come before anything else starts JAX.
    from hdex_jax import hub
    from hdex_jax.lpu import PRESETS
    from hdex_jax.transformers import AutoModelForCausalLM

    if args.preset not in PRESETS:  # checked now, not after the first point has been measured
        parser.error(f"--preset must be one of {sorted(PRESETS)}, got {args.preset!r}")
    models = args.models or [hub.DEFAULT_MODEL]
    points = grid(models, sorted(set(args.devices) | {1}), args.contexts, args.new_tokens)
    # One compiled length serves every point, so a later context never recompiles the weights' layout.
    max_length = max(args.contexts) + args.new_tokens

    def load(model_id: str, num_device: int) -> Any:
        return AutoModelForCausalLM.from_pretrained(model_id, device_map={"lpu": num_device}, max_length=max_length)

    run_grid(points, args.csv, load, lambda model, point: measure(model, point, args.runs, args.preset))
    wanted = set(points)
    rows = [row for row in read_rows(args.csv) if row.point in wanted]
    all_same = report(rows)
    plot(rows, args.plot)
    print(f"wrote {args.csv} and {args.plot}")
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())
