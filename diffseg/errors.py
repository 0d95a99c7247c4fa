"""The errors a user can fix. The entry points print each as one ``error:`` line and exit 2.

Everything else (a bug) keeps its traceback.
"""

from __future__ import annotations

__all__ = ["ConfigError", "DataError", "ResumeError", "RunError"]


class RunError(Exception):
    """A problem the user can fix (bad config value, missing data or weights, run dir clash)."""


class ConfigError(RunError, ValueError):
    """A config value is invalid or the data/weights it points at cannot be used."""


class ResumeError(RunError):
    """The run dir holds a run of another configuration, or its files are damaged."""


class DataError(RunError, ValueError):
    """A data file is missing, unreadable, corrupt, or holds a value outside the dataset's set.

    The message names the file (and the value) and says how to fix it. It is a ``ValueError``
    too, so code written against the loaders' earlier ``ValueError`` keeps working.
    """
