"""scripts/scaling.py: a grid of two points on a tiny model, resumed from its CSV."""

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.helpers_tiny import save_tiny_checkpoint

SCRIPT = Path(__file__).parent.parent / "scripts" / "scaling.py"


@pytest.fixture(scope="module")
def scaling():
    """The script as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("scaling_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolve string annotations through sys.modules, so the module must be there while it runs.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_grid_resumes_from_its_csv(scaling, home, tmp_path, monkeypatch):
    checkpoint = save_tiny_checkpoint("llama", tmp_path / "tiny")
    csv_path, png = tmp_path / "grid.csv", tmp_path / "grid.png"
    argv = ["--models", str(checkpoint), "--devices", "2", "--contexts", "8", "--new-tokens", "4", "--runs", "1",
            "--csv", str(csv_path), "--plot", str(png)]

    measured = []
    measure = scaling.measure

    def counting_measure(model, point, runs, preset):
        measured.append(point)
        return measure(model, point, runs, preset)

    monkeypatch.setattr(scaling, "measure", counting_measure)

    # N=1 is added as the reference: two points, N=2 with N=1's tokens.
    assert scaling.main(argv) == 0
    assert [(p.num_device, p.context_len) for p in measured] == [(1, 8), (2, 8)]
    lines = csv_path.read_text().splitlines()
    assert lines[0].split(",") == scaling.FIELDS and len(lines) == 3
    rows = scaling.read_rows(csv_path)
    assert rows[0].sync_bytes_per_token == 0 < rows[1].sync_bytes_per_token
    assert rows[1].param_bytes_per_device < rows[0].param_bytes_per_device
    assert (rows[0].greedy_tokens, rows[0].sampled_tokens) == (rows[1].greedy_tokens, rows[1].sampled_tokens)
    assert png.stat().st_size > 0

    # The same grid again: every point is in the CSV, nothing is computed and the CSV is unchanged.
    before = csv_path.read_bytes()
    measured.clear()
    assert scaling.main(argv) == 0
    assert measured == [] and csv_path.read_bytes() == before

    # The N=2 row missing and a torn line after the rest (a crash inside a write): only N=2 is recomputed.
    csv_path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])
    assert scaling.main(argv) == 0
    assert [(p.num_device, p.context_len) for p in measured] == [(2, 8)]
    again = csv_path.read_text().splitlines()
    assert again[:2] == lines[:2] and len(again) == 3
    assert again[2].split(",")[:4] == lines[2].split(",")[:4]  # the same point; its timing may differ
