"""Test setup: JAX on CPU with 8 virtual devices (set before JAX starts), and a fresh HDEX_HOME per module."""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A fresh HDEX_HOME for one test module's compiled artifacts."""
    path = tmp_path_factory.mktemp("hdex_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HDEX_HOME", str(path))
        yield path
