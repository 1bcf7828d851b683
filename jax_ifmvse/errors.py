"""The package's one error base class: what reaches the user as a one-line CLI error.

Every error about the user's input (a file, a setting, a checkpoint, a run directory) derives from
`IfmvseError`, and its `str()` is one line naming the file or key and the reason. The CLI turns
these (and `featurestore.StoreError`, the store's own, JAX-free error) into one-line messages in
one place (`jax_ifmvse.cli`); anything else is a bug and keeps its traceback.

This module imports nothing, so every module (and `featurestore`'s callers) can import it cheaply.
"""

from __future__ import annotations


class IfmvseError(Exception):
    """An error about the user's input; `str()` is one line naming the file or key and why."""


class BadSource(IfmvseError, ValueError):
    """A backbone SOURCE that cannot be loaded; the message is one line naming file and reason."""


class RunError(IfmvseError, ValueError):
    """A RUN/ directory that cannot be used: its manifest missing, unreadable or unfinished."""


class TrainError(IfmvseError, ValueError):
    """A training run that cannot start: bad data, a conflicting RUN/ directory, bad settings."""


def first_line(error: BaseException) -> str:
    """The message a user sees: the first line of `str(error)`, else the exception's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
