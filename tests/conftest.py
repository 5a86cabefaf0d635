"""Test setup: JAX on CPU with 8 virtual devices (set before JAX starts), and never the user's cache.

Every test runs with HDEX_HOME in a temporary directory: one for the whole session (for each worker under
pytest-xdist), and a fresh one per module that asks for the `home` fixture. Subprocesses and notebook kernels
inherit it through the environment. The default model's GGUF lands in the session's `downloads/` and the decode
kernel in its `kernels/`, which every module's HDEX_HOME links to, so each is fetched or built at most once per
session. At the end the session fails if the user's cache (`~/.cache/hdex_jax`, or the HDEX_HOME the suite was
started with) changed.
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hdex_jax import runtime  # noqa: E402  (after the environment above, which JAX reads when imported)

# The cache the user had before the suite touched the environment; the suite must leave it as it was.
USER_CACHE = Path(os.environ.get("HDEX_HOME") or Path.home() / ".cache" / "hdex_jax").expanduser()


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime in ns) of everything under `root`."""
    if not root.exists():
        return {}
    entries = {}
    for path in [root, *root.rglob("*")]:
        stat = path.lstat()
        entries[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return entries


def pytest_sessionstart(session):
    session.config.stash[_USER_CACHE_KEY] = _listing(USER_CACHE)


def pytest_sessionfinish(session, exitstatus):
    if _listing(USER_CACHE) != session.config.stash[_USER_CACHE_KEY]:
        session.config.get_terminal_writer().line(f"\nthe test session changed the user's cache {USER_CACHE}; "
                                                  f"every test must use a temporary HDEX_HOME", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_USER_CACHE_KEY = pytest.StashKey[dict]()


@pytest.fixture(scope="session", autouse=True)
def session_home(tmp_path_factory):
    """HDEX_HOME for the whole session, in a temporary directory."""
    path = tmp_path_factory.mktemp("hdex_home_session")
    (path / "downloads").mkdir()
    (path / "kernels").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HDEX_HOME", str(path))
        # What the entry points do, for the tests that trace generation, the model or matvec directly; in the
        # session's HDEX_HOME, so the kernel is built there.
        runtime.setup()
        yield path


@pytest.fixture(scope="module")
def home(tmp_path_factory, session_home):
    """A fresh HDEX_HOME for one test module's compiled artifacts (sharing the session's downloads and the
    decode kernel built in it)."""
    path = tmp_path_factory.mktemp("hdex_home")
    for shared in ("downloads", "kernels"):
        (path / shared).symlink_to(session_home / shared, target_is_directory=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HDEX_HOME", str(path))
        yield path
