"""Named exceptions. The CLI turns every one into a one-line message and an exit code.

Exit codes: 0 success, 1 `verify` found a problem, 2 bad usage or unreadable input,
130 / 143 interrupted by SIGINT / SIGTERM.
"""

from __future__ import annotations


class MoegrowError(Exception):
    """Base class: an expected failure with a one-line, user-facing message."""

    exit_code = 2


class SourceError(MoegrowError):
    """The source checkpoint cannot be read (missing, corrupt, pickle-only, not on the Hub)."""


class ConfigError(MoegrowError):
    """config.json is missing, invalid, or disagrees with the tensors."""


class UnsupportedModelError(MoegrowError):
    """The model is dense, unknown, or its layout cannot express the requested growth."""


class GrowthError(MoegrowError):
    """The requested growth is invalid for this model (factor, layer map, top-k)."""


class OutputError(MoegrowError):
    """OUTPUT cannot be written (exists, overlaps the source, not writable, disk full)."""


class VerificationFailed(MoegrowError):
    """`verify` found a problem in a grown checkpoint."""

    exit_code = 1
