"""User-facing errors.

Anything the user can fix (recipe, data, paths, CLI usage) raises a ``UserError``; the CLI prints
its one-line message and exits with code 2, without a traceback. Everything else is a bug or an
environment failure and keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit code 2."""

    exit_code = 2


class RecipeError(UserError):
    """The recipe (YAML or overrides) is invalid."""


class DataError(UserError):
    """A data source or row is invalid; the message names the file and row."""


class TemplateError(UserError):
    """A chat template cannot be used (missing, raises, or cannot be masked reliably)."""
