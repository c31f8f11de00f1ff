"""Errors shared by every service.

OmnicrmError
 ├── ConfigError          a setting is missing or malformed (names the variable)
 ├── TransientError       infrastructure hiccup: retry with a bound
 └── PermanentError       this record can never be applied: dead-letter it
      └── SchemaError     undecodable Avro (unknown fingerprint, bad bytes)
"""

from __future__ import annotations


class OmnicrmError(Exception):
    """Base class of every error omnicrm raises on purpose."""


class ConfigError(OmnicrmError):
    """A configuration value is missing or malformed; names the variable."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable


class TransientError(OmnicrmError):
    """A failure that may go away on retry (broker or database unavailable)."""


class PermanentError(OmnicrmError):
    """A record that can never be applied; it goes to the dead-letter topic."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason


class SchemaError(PermanentError):
    """Bytes that are not a known Avro single-object record."""
