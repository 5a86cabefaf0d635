"""The notebooks run top to bottom (their own asserts included)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


# The quickstart compiles the default model in the session's HDEX_HOME, as tests/test_smollm2.py does: one worker
# under pytest-xdist, so that one compile serves both.
@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.xdist_group("default_model"), id=p.stem)
                                  if p.stem == "quickstart" else pytest.param(p, id=p.stem) for p in NOTEBOOKS])
def test_notebook_runs(path):
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
