"""The package's shape (README, "Architecture"): no import circle, function-level imports of project modules
only where a start-up cost is measured, and no side effect of importing hdex_jax."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("hdex_jax", "converters")
# (importing module, imported module) inside a function, each kept off start-up on purpose (README, "Architecture").
DEFERRED = {
    ("converters", "converters.gguf_tokenizer"): "imports transformers (0.75 s at rest), only for a GGUF's tokenizer",
    ("hdex_jax.cli", "converters.gguf_file"): "converters (0.06 s at rest) only for `hdex models`",
    ("hdex_jax.cli", "converters.registry"): "converters (0.06 s at rest) only for `hdex models`",
    ("hdex_jax.lpu.calibration", "converters"): "converters (0.06 s at rest) only when calibrating from HF configs",
    ("hdex_jax.lpu.config_source", "converters"): "converters (0.06 s at rest) only for a checkpoint's own config",
    ("hdex_jax.tools.compiler", "converters"): "converters (0.06 s at rest) only when a checkpoint is converted",
    ("hdex_jax.transformers", "hdex_jax.transformers.streamer"): "TextStreamer imports transformers (0.45 s at rest)",
    ("hdex_jax.transformers.tokenizer", "converters"): "converters (0.06 s at rest) only for an uncompiled model's "
                                                 "tokenizer",
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(modules: dict[str, Path]) -> tuple[dict[str, set[str]], set[tuple[str, str]]]:
    """Module-level imports of project modules (TYPE_CHECKING blocks left out; a module's own packages, which
    Python initialises before it, too) and the (module, imported) pairs imported inside a function."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    deferred: set[tuple[str, str]] = set()
    for name, path in modules.items():
        edges: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]

        def visit(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    if isinstance(child, ast.Import):
                        targets = [alias.name for alias in child.names]
                    else:
                        base = child.module or ""
                        if child.level:
                            parent = package
                            for _ in range(child.level - 1):
                                parent = parent.rpartition(".")[0]
                            base = f"{parent}.{base}" if base else parent
                        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in child.names]
                    for target in filter(None, map(resolve, targets)):
                        if target != name and not name.startswith(target + "."):
                            (deferred.add((name, target)) if in_function else edges.add(target))
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

        visit(ast.parse(path.read_text()), False)
        # Importing a.b.c runs a/__init__ and a/b/__init__ first.
        parents = {".".join(e.split(".")[:i]) for e in edges for i in range(1, e.count(".") + 1)}
        graph[name] = edges | {p for p in parents if p in modules and p != name and not name.startswith(p + ".")}
    return graph, deferred


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph`, or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    return next((found for node in sorted(graph) if node not in state and (found := visit(node))), None)


def test_no_import_circle_and_only_the_deferred_imports_named_with_their_reason() -> None:
    graph, deferred = _imports(_modules())
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph))}"
    assert deferred == set(DEFERRED), (f"imports inside functions not listed: {sorted(deferred - set(DEFERRED))}; "
                                       f"listed but gone: {sorted(set(DEFERRED) - deferred)}")


def test_the_circle_check_finds_a_circle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_importing_hdex_jax_changes_no_configuration_and_builds_nothing(tmp_path: Path) -> None:
    """`import hdex_jax` and its entry points' modules leave JAX's configuration, the environment and HDEX_HOME as
    they were; `runtime.setup()` is what changes them."""
    child = """
import json, os, sys
import jax
before = jax.config.jax_num_cpu_devices
import hdex_jax, hdex_jax.transformers, hdex_jax.tools, hdex_jax.cli
imported = {"devices": jax.config.jax_num_cpu_devices, "before": before,
            "advisory": os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS"), "home": os.path.exists(sys.argv[1])}
from hdex_jax import runtime
runtime.setup()
imported["after_setup"] = jax.config.jax_num_cpu_devices
print(json.dumps(imported))
"""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
    env.update(HDEX_HOME=str(home), HDEX_MATVEC="0")
    done = subprocess.run([sys.executable, "-c", child, str(home)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["devices"] == seen["before"] and seen["advisory"] is None and not seen["home"], seen
    assert seen["after_setup"] == 8, seen
