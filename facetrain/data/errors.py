"""Dataset error types: the one home of DatasetError (import it from here), shared by the index
checks, the dataset code and its callers without importing each other."""
from __future__ import annotations


class DatasetError(ValueError):
    """A dataset that breaks the format; the message names the file and the key or offset."""


class StaleIndexError(DatasetError):
    """The .idx does not match the .rec; rebuilding it from the .rec is the fix."""
