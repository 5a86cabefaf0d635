"""Follow `model_id` from `AutoModelForCausalLM.from_pretrained` through every call that passes it on.

    python scripts/trace_model_id.py [--model SmolLM2-135M-Instruct] [--num-device 1]

A profile hook watches every call into hdex_jax/ and converters/ that receives `model_id`'s value as an
argument (with --with-store, also the `ModelStore` or `ModelSource` made from it, `self` included); the walk goes into the callee's file at such a call and back to the caller's file when it returns.
It prints the walk (files in the order visited, consecutive visits to one file merged), how many distinct files
it enters and how many times it returns to a file it had already left. Run it twice: on a model not compiled
yet (the walk includes the compile) and again (the load alone). The redesign issue asks for at most 7 files and
at most 3 returns.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def walk(model_id: str, num_device: int, with_store: bool) -> list[str]:
    """The files visited, in order, each entry one call into or return to a file; `with_store` also follows the
    calls that receive the model's `ModelStore` or `ModelSource` (which carry the id) instead of the id."""
    from hdex_jax.hub import ModelSource
    from hdex_jax.model_store import ModelStore
    from hdex_jax.transformers import AutoModelForCausalLM

    def carries(value: object) -> bool:
        if isinstance(value, str):
            return value == model_id
        if isinstance(value, ModelStore):
            value = vars(value).get("source")  # None while the store's __init__ runs
        return with_store and isinstance(value, ModelSource) and value.model_id == model_id

    frames: list[tuple[object, str]] = []  # the calls that received model_id, innermost last
    visits: list[str] = ["hdex_jax/transformers/modeling.py"]

    roots = tuple(str(ROOT / package) + "/" for package in ("hdex_jax", "converters"))
    names: dict[object, str | None] = {}  # per code object: its project file, or None

    def project_file(code) -> str | None:
        if code not in names:
            path = code.co_filename
            names[code] = Path(path).relative_to(ROOT).as_posix() if path.startswith(roots) else None
        return names[code]

    def hook(frame, event, arg):
        if event == "call":
            code = frame.f_code
            name = project_file(code)
            if name is None:
                return
            arguments = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
            if any(carries(frame.f_locals.get(a)) for a in arguments):
                frames.append((frame, name))
                visits.append(name)
        elif event == "return" and frames and frames[-1][0] is frame:
            frames.pop()
            visits.append(frames[-1][1] if frames else "hdex_jax/transformers/modeling.py")

    sys.setprofile(hook)
    try:
        AutoModelForCausalLM.from_pretrained(model_id, device_map={"lpu": num_device})
    finally:
        sys.setprofile(None)
    return [v for i, v in enumerate(visits) if i == 0 or v != visits[i - 1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--num-device", type=int, default=1)
    parser.add_argument("--with-store", action="store_true",
                        help="also follow the calls that receive the ModelStore or ModelSource made from the id")
    args = parser.parse_args()
    visits = walk(args.model, args.num_device, args.with_store)
    left: set[str] = set()
    returns = 0
    for previous, current in zip(visits, visits[1:]):
        left.add(previous)
        returns += current in left
    print(" -> ".join(visits))
    print(f"files: {len(set(visits))}, returns to a file already left: {returns}")


if __name__ == "__main__":
    main()
