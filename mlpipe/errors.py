"""Error types. Anything derived from `InputError` is the user's to fix (CLI exit 2)."""

from __future__ import annotations


class MlpipeError(Exception):
    """Base class of every error mlpipe raises on purpose."""


class InputError(MlpipeError):
    """Bad input: data, formula, options or configuration. Exit code 2 from the CLI."""


class FormulaError(InputError):
    """A formula that cannot be parsed or does not fit the data."""


class DataError(InputError):
    """Data that cannot be read or cannot support the model."""
