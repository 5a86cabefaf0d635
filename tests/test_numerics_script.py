"""scripts/numerics.py on a tiny Q4_1 GGUF: its tables measure what they say."""

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.helpers_tiny import write_tiny_gguf

SCRIPTS = Path(__file__).parent.parent / "scripts"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def numerics():
    """The script as a module (scripts/ is not a package; it imports bench_decode beside it)."""
    sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location("numerics_script", SCRIPTS / "numerics.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]
    sys.path.remove(str(SCRIPTS))


def _rows(markdown: str) -> dict[str, list[str]]:
    """Each table row of the report by its first cell, the other cells as text."""
    cells = [line.strip("|").split(" | ") for line in markdown.splitlines() if line.startswith("| ")]
    return {row[0].strip(): [c.strip() for c in row[1:]] for row in cells}


def test_tables_compare_each_format_with_float32(numerics, home, tmp_path):
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_path, "Q4_1")
    out = tmp_path / "numerics.md"
    assert numerics.main(["--model", str(gguf_path), "--formats", "auto", "--prompts", "3",
                          "--new-tokens", str(NEW_TOKENS), "--text-rows", "2", "--text-row", "16",
                          "--out", str(out)]) == 0
    rows = _rows(out.read_text())
    # columns: weights MB, identical, mean first divergence, max |dlogit|, mean |dlogit|, perplexity, change
    auto = next(cells for name, cells in rows.items() if name.startswith("hdex_jax auto"))
    fp32 = rows["hdex_jax float32 (the reference)"]
    # The Q4_1 blocks as stored, computed in float32, are the values float32 dequantized at conversion: the
    # same tokens and logits, in a fraction of the bytes. transformers float32 dequantizes them too.
    for same in (auto, rows["transformers float32"], rows["hdex_jax float32 vs transformers float32"]):
        assert same[1:3] == ["100%", f"{NEW_TOKENS:.1f}"], same
        assert float(same[3]) < 1e-3 and abs(float(same[6])) < 1e-3, same
    assert float(auto[0]) < 0.5 * float(fp32[0])
    assert {"transformers bfloat16", "transformers float16"} <= rows.keys()
