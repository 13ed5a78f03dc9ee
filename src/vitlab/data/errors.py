"""Errors raised by ``vitlab.data``.

Every error is a ``ValueError`` (through :class:`DataError`), so callers that already catch bad input keep
working, and every message names the offending input and what was expected.
"""

__all__ = ["ChannelMismatchError", "DataError", "DatasetNotFoundError", "IdxFormatError", "ImageReadError"]


class DataError(ValueError):
    """Base class for bad or missing data."""


class IdxFormatError(DataError):
    """An IDX file (the MNIST / Fashion-MNIST format) is malformed, truncated or not uint8."""


class DatasetNotFoundError(DataError):
    """A dataset or one of its files cannot be found (or fetched)."""


class ImageReadError(DataError):
    """An image file cannot be opened or decoded."""


class ChannelMismatchError(DataError):
    """A channel count cannot be matched to the one expected."""
