"""Errors raised by the model package.

All of them derive from :class:`core.errors.NodeError`, the node's single
error hierarchy.
"""

from __future__ import annotations

from core.errors import NodeError


class ModelError(NodeError):
    """Base class of the errors raised by :mod:`model`."""


class ModelLoadError(ModelError):
    """A model directory, checkpoint or text encoder cannot be loaded.

    The message names the path and what is wrong (missing file, mismatched
    keys or shapes, unreadable configuration).
    """


class ModelInputError(ModelError):
    """An input given to the model does not match its contract (shape, dtype, range)."""
