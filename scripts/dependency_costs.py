"""What flax and orbax-checkpoint would cost hdex_jax at run time: import time and weight-restore time.

hdex_jax's params are plain pytrees of arrays (hdex_jax/params.py), not flax modules, and its compiled weights
are one safetensors file per device count, read straight onto the device mesh by `artifacts.restore_params`
(each device reads only its shard), not an orbax checkpoint. This script measures what the alternatives cost,
in one run, each figure the median of --runs fresh processes (the kinds interleaved, so that machine noise hits
all alike; ratios within one run are what to read on a busy machine):

  imports   `import X` timed inside a fresh `python -c` process, for jax (the floor), hdex_jax.transformers
            (what a user's `from_pretrained` imports today), flax.nnx, flax.linen and orbax.checkpoint, each
            alone and the last two on top of hdex_jax.transformers (the real marginal cost to hdex_jax).
  restore   the default model's weights laid out for --num-device devices, in a fresh process:
            hdex_jax: `restore_params(param_dir, param_shardings(cfg, mesh), ...)` as
                      `hdex_jax.transformers.modeling._load_placement` calls it;
            orbax:    the same pytree saved once with `ocp.StandardCheckpointer().save` (orbax's defaults), then
                      `StandardCheckpointer().restore(path, target)` with `jax.ShapeDtypeStruct(shape, dtype,
                      sharding=...)` targets on the same shardings (orbax's documented sharded restore).
            Both children import the same hdex_jax modules (config, layout, sharding, artifacts, formats), the
            orbax one `orbax.checkpoint` as well; each figure is the restore alone (to `block_until_ready`) and
            the time from spawning the process to its weights on the devices. One untimed run of each first,
            so both files are in the page cache. A separate process checks that both give bit-identical
            shards on identical shardings.

    pip install flax orbax-checkpoint     # into a venv of its own: neither is a dependency of hdex_jax
    hdex compile SmolLM2-135M-Instruct --num-device 2
    python scripts/dependency_costs.py [--model SmolLM2-135M-Instruct] [--num-device 2] [--runs 5]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (label, the import statement the child times)
IMPORTS = [
    ("import jax", "import jax"),
    ("import hdex_jax.transformers", "import hdex_jax.transformers"),
    ("import flax.nnx", "import flax.nnx"),
    ("import flax.linen", "import flax.linen"),
    ("import orbax.checkpoint", "import orbax.checkpoint"),
    ("import hdex_jax.transformers, flax.nnx", "import hdex_jax.transformers, flax.nnx"),
    ("import hdex_jax.transformers, orbax.checkpoint", "import hdex_jax.transformers, orbax.checkpoint"),
]

_IMPORT_CHILD = """
import time
started_at = time.time()
t0 = time.perf_counter()
{statement}
seconds = time.perf_counter() - t0
import json
print(json.dumps({{"import": seconds, "imported_at": started_at + seconds}}))
"""

# Shared by the restore children: the placement of `_load_placement` (hdex_jax/transformers/modeling.py).
_SETUP = """
import time
started_at = time.time()
t0 = time.perf_counter()
import json, sys
from pathlib import Path
kind, model_dir, num_device = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
import jax
import numpy as np
from hdex_jax import artifacts, formats
from hdex_jax.config import ModelConfig
from hdex_jax.layout import padded_config
from hdex_jax.sharding import make_mesh, param_shardings
if kind != "hdex_jax":
    import orbax.checkpoint as ocp
imported = time.perf_counter()
params_dir = artifacts.param_dir(model_dir, num_device)
manifest = artifacts.read_manifest(params_dir)
cfg = padded_config(formats.from_manifest(ModelConfig.load(artifacts.ckpt_dir(model_dir)), manifest), num_device)
mesh = make_mesh(num_device)
shardings = param_shardings(cfg, mesh)

def wrong_layout(why):
    return ValueError(f"{params_dir}: {why}")

def restore_hdex():
    return jax.block_until_ready(artifacts.restore_params(params_dir, shardings, wrong_layout))

def restore_orbax(path, shapes):
    flat, treedef = jax.tree.flatten(shardings)
    assert len(flat) == len(shapes), (len(flat), len(shapes))
    target = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype), sharding=s)
                                          for s, (shape, dtype) in zip(flat, shapes)])
    return jax.block_until_ready(ocp.StandardCheckpointer().restore(path, target))
"""

_RESTORE_CHILD = _SETUP + """
ready = time.perf_counter()
if kind == "hdex_jax":
    params = restore_hdex()
else:
    orbax_dir = Path(sys.argv[4])
    params = restore_orbax(orbax_dir / "ckpt", json.loads((orbax_dir / "shapes.json").read_text()))
done = time.perf_counter()
leaves = jax.tree.leaves(params)
print(json.dumps({"imports": imported - t0, "setup": ready - imported, "restore": done - ready,
                  "restored_at": started_at + (done - t0), "leaves": len(leaves),
                  "bytes": sum(x.nbytes for x in leaves), "devices": len(jax.devices())}))
"""

_SAVE_CHILD = _SETUP + """
orbax_dir = Path(sys.argv[4])
params = restore_hdex()
leaves = jax.tree.leaves(params)
(orbax_dir / "shapes.json").write_text(json.dumps([[list(x.shape), str(x.dtype)] for x in leaves]))
checkpointer = ocp.StandardCheckpointer()
t = time.perf_counter()
checkpointer.save(orbax_dir / "ckpt", params)
checkpointer.wait_until_finished()
print(json.dumps({"save": time.perf_counter() - t}))
"""

_VERIFY_CHILD = _SETUP + """
orbax_dir = Path(sys.argv[4])
ours = restore_hdex()
theirs = restore_orbax(orbax_dir / "ckpt", json.loads((orbax_dir / "shapes.json").read_text()))
problems = []
if jax.tree.structure(ours) != jax.tree.structure(theirs):
    problems.append("tree structures differ")
names = jax.tree.leaves(jax.tree_util.tree_map_with_path(lambda p, _: jax.tree_util.keystr(p), ours))
shards = 0
for name, a, b in zip(names, jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    if a.shape != b.shape or a.dtype != b.dtype or a.sharding != b.sharding:
        problems.append(f"{name}: {a.shape} {a.dtype} {a.sharding} vs {b.shape} {b.dtype} {b.sharding}")
        continue
    sa = {s.device.id: s for s in a.addressable_shards}
    sb = {s.device.id: s for s in b.addressable_shards}
    for device, s in sa.items():
        t = sb.get(device)
        shards += 1
        if t is None or s.index != t.index or np.asarray(s.data).tobytes() != np.asarray(t.data).tobytes():
            problems.append(f"{name}: the shard on device {device} differs")
print(json.dumps({"problems": problems[:5], "count": len(problems), "leaves": len(names), "shards": shards}))
"""


def child(code: str, *args: str) -> tuple[dict, float]:
    """Run `code` in a fresh interpreter; its last stdout line (JSON) and the wall time it was spawned at."""
    spawned_at = time.time()
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                            env=os.environ)
    if result.returncode != 0:
        raise SystemExit(f"a child process failed ({args or code.strip().splitlines()[-3]}):\n"
                         f"{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1]), spawned_at


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except FileNotFoundError:
        pass
    return platform.processor() or "unknown"


def du(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--num-device", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    missing = [d for d in ("flax", "orbax-checkpoint") if version(d) == "not installed"]
    if missing:
        raise SystemExit(f"{' and '.join(missing)} not installed: pip install flax orbax-checkpoint (in a venv of "
                         f"its own; hdex_jax does not depend on them)")

    from hdex_jax import artifacts, hub

    model_dir = hub.model_dir(args.model)
    params_dir = artifacts.param_dir(model_dir, args.num_device)
    if artifacts.current_manifest(params_dir) is None:
        raise SystemExit(f"{args.model} is not compiled for {args.num_device} device(s) in {model_dir}: "
                         f"hdex compile {args.model} --num-device {args.num_device}")

    print(f"jax {version('jax')} (jaxlib {version('jaxlib')}), flax {version('flax')}, orbax-checkpoint "
          f"{version('orbax-checkpoint')}, safetensors {version('safetensors')}, tensorstore "
          f"{version('tensorstore')}; Python {platform.python_version()}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs; {args.runs} fresh processes per figure "
          f"(median); load average at the start {os.getloadavg()[0]:.1f}\n", flush=True)

    with tempfile.TemporaryDirectory(prefix="hdex_orbax_") as tmp:
        orbax_dir = Path(tmp)
        common = [str(model_dir), str(args.num_device), str(orbax_dir)]
        saved, _ = child(_SAVE_CHILD, "orbax", *common)
        checked, _ = child(_VERIFY_CHILD, "orbax", *common)
        if checked["count"]:
            raise SystemExit(f"orbax's restore differs from hdex_jax's in {checked['count']} place(s): "
                             f"{checked['problems']}")
        sizes = (du(params_dir / artifacts.WEIGHTS_FILE), du(orbax_dir / "ckpt"))
        kinds = ("hdex_jax", "orbax")
        for kind in kinds:  # untimed: both files in the page cache, the decode kernel's import warm
            child(_RESTORE_CHILD, kind, *common)

        imports: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in IMPORTS}
        restores: dict[str, list[dict]] = {kind: [] for kind in kinds}
        for run in range(args.runs):
            for label, statement in IMPORTS:
                report, spawned_at = child(_IMPORT_CHILD.format(statement=statement))
                imports[label].append((report["import"], report["imported_at"] - spawned_at))
            for kind in kinds:
                report, spawned_at = child(_RESTORE_CHILD, kind, *common)
                report["from_spawn"] = report["restored_at"] - spawned_at
                restores[kind].append(report)
            print(f"  run {run + 1}/{args.runs} done", file=sys.stderr, flush=True)

    def median(values: list[float]) -> float:
        return statistics.median(values)

    print("Import time (in the process; spawn-to-imported in brackets), extra over `import jax` and over "
          "`import hdex_jax.transformers`:")
    floor = median([s for s, _ in imports["import jax"]])
    ours = median([s for s, _ in imports["import hdex_jax.transformers"]])
    width = max(len(label) for label in imports)
    for label, samples in imports.items():
        seconds, spawn = median([s for s, _ in samples]), median([w for _, w in samples])
        line = f"  {label:<{width}}  {seconds:6.2f} s  ({spawn:5.2f} s)  +{seconds - floor:5.2f} s over jax"
        if label.startswith("import hdex_jax.transformers,"):
            line += f", +{seconds - ours:5.2f} s over hdex_jax.transformers ({seconds / ours:.2f}x)"
        print(line)
    spread = {label: (min(s for s, _ in v), max(s for s, _ in v)) for label, v in imports.items()}
    print("  (min-max over the runs: " + "; ".join(f"{label.removeprefix('import ')} {lo:.2f}-{hi:.2f}"
                                                  for label, (lo, hi) in spread.items()) + ")")

    first = restores["hdex_jax"][0]
    print(f"\nRestore of {args.model}'s weights laid out for {args.num_device} devices ({first['leaves']} "
          f"arrays, {first['bytes'] / 1e6:.1f} MB on {args.num_device} of {first['devices']} CPU devices; "
          f"safetensors file {sizes[0] / 1e6:.1f} MB, orbax checkpoint {sizes[1] / 1e6:.1f} MB, saved once "
          f"in {saved['save']:.2f} s; bit-identical: {checked['leaves']} arrays, {checked['shards']} shards):")
    base = {key: median([r[key] for r in restores["hdex_jax"]]) for key in ("restore", "from_spawn", "imports")}
    for kind in kinds:
        got = {key: median([r[key] for r in restores[kind]]) for key in ("restore", "from_spawn", "imports",
                                                                         "setup")}
        lo, hi = min(r["restore"] for r in restores[kind]), max(r["restore"] for r in restores[kind])
        print(f"  {kind:<8}  restore alone {got['restore']:5.2f} s ({got['restore'] / base['restore']:4.2f}x; "
              f"min-max {lo:.2f}-{hi:.2f})  spawn to weights on the devices {got['from_spawn']:5.2f} s "
              f"({got['from_spawn'] / base['from_spawn']:4.2f}x)  [imports {got['imports']:.2f} s, mesh and "
              f"shardings {got['setup']:.2f} s]")
    print(f"\nload average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} logical CPUs: absolute times are "
          f"only as steady as the machine; compare within one run")


if __name__ == "__main__":
    main()
