"""Counting XLA compilations in tests, for the promises that something compiles nothing."""

import contextlib
from collections.abc import Iterator

import jax
from jax._src import dispatch


@contextlib.contextmanager
def counting_compilations() -> Iterator[list[str]]:
    """Count XLA backend compilations (jax.monitoring's compile event) inside the block."""
    count = []

    def listener(event: str, duration: float, **_) -> None:
        if event == dispatch.BACKEND_COMPILE_EVENT:
            count.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
