"""The two errors every converter raises, so callers can tell "we don't do this family" from "this file is bad"."""

from __future__ import annotations


class UnsupportedModelError(ValueError):
    """The checkpoint is of a model family (model_type or GGUF architecture) with no converter."""


class CheckpointError(ValueError):
    """A checkpoint file or its contents is bad, missing, truncated, or cannot be mapped; the message names it."""
