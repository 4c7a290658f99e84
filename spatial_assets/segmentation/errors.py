"""The one error type of the segmentation package: bad input, named by its file."""

from __future__ import annotations


class SegmentationInputError(ValueError):
    """A raw folder, file or option that cannot be used as given; the message names the file."""


class MethodUnavailableError(SegmentationInputError):
    """A segmentation method whose binary, package or weights are not on this machine (never downloaded)."""


__all__ = ["MethodUnavailableError", "SegmentationInputError"]
