"""Errors a user can act on: each message is one line saying what is wrong and how to fix it."""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is wrong; the message is one line: what and how to fix."""


class DataError(ConfigError):
    """The dataset cannot be used as configured (one line: what is wrong, how to fix it)."""
