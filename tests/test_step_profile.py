"""scripts/step_profile.py: every thunk of a tiny model's decode step is found in the profile, with its shapes."""

import math
import re
import sys
from pathlib import Path

import pytest

from tests.helpers_tiny import save_tiny_checkpoint

SCRIPTS = Path(__file__).parent.parent / "scripts"


@pytest.fixture(scope="module")
def scripts():
    """scripts/ on sys.path (it is not a package; step_profile imports op_cost from it)."""
    sys.path.insert(0, str(SCRIPTS))
    import op_cost
    import step_profile
    yield op_cost, step_profile
    sys.path.remove(str(SCRIPTS))
    del sys.modules["op_cost"], sys.modules["step_profile"]


def test_profile_holds_every_thunk_of_the_step(scripts, home, tmp_path):
    op_cost, step_profile = scripts
    compiled, inputs = op_cost.decode_step(str(save_tiny_checkpoint("llama", tmp_path / "tiny")), slots=32)
    hlo = compiled.as_text()
    steps = 3
    groups, seconds = step_profile.profile(compiled, inputs, steps)

    # Each thunk of the optimized program ran once per step, by kind: dots by their shapes, fusions by name.
    thunks = op_cost.computation_thunks(hlo)
    assert sum(g.count for g in groups.values()) == steps * sum(thunks.values())
    dots = step_profile.dot_signatures(hlo)
    products = thunks["dot"] + thunks["custom-call"]  # XLA's dots and the decode kernel's calls
    assert sum(g.count for k, g in groups.items() if "<-" in k) == steps * products == steps * len(dots)
    assert all(g.nanoseconds > 0 for g in groups.values()) and seconds > 0

    # A signature's bytes are its operands' as the HLO declares them.
    for signature, read in dots.values():
        operands = re.findall(r"f32\[([\d,]*)\]", signature.split("<-")[1])
        assert read == sum(4 * math.prod(int(d) for d in dims.split(",") if d) for dims in operands)

    lines = step_profile.report(groups, steps, seconds)
    assert f"{sum(thunks.values())} thunks per step" in lines[-1]
