"""Dataset error types, in their own module so the index checks and the dataset code can share
them without importing each other."""
from __future__ import annotations


class DatasetError(ValueError):
    """A dataset that breaks the format; the message names the file and the key or offset."""


class StaleIndexError(DatasetError):
    """The .idx does not match the .rec; rebuilding it from the .rec is the fix."""
