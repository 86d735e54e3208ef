"""Exceptions that carry a message meant for the user (exit code 2, no traceback)."""

from __future__ import annotations


class LHTError(Exception):
    """A user mistake: the message says what is wrong and how to fix it."""

    exit_code = 2


class ConfigError(LHTError):
    """The configuration file, an override or an environment variable is invalid."""


class DataError(LHTError):
    """An input corpus or document is missing or malformed."""


class CheckpointError(LHTError):
    """A checkpoint is missing, incomplete, untrusted or does not fit the model."""


class NotReadyError(LHTError):
    """A command whose implementation has not landed yet."""
