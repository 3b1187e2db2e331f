"""peftvlm's exception hierarchy and the one place that formats errors for the terminal.

Every error a user can cause by their input is a `PeftVLMError`: a one-paragraph message that
names the file, field or row, plus a hint on how to fix it. The CLI prints it and exits with
code 2; `PEFTVLM_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations


class PeftVLMError(Exception):
    """A user-facing error: `message` says what is wrong, `hint` how to fix it."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\nHint: {self.hint}"


class RecipeError(PeftVLMError):
    """The recipe file is missing, unreadable or does not match the schema."""


class DataError(PeftVLMError):
    """The data (files, rows, images) cannot be used as the recipe says."""


class ModelError(PeftVLMError):
    """The base model or processor cannot be loaded or is not supported."""


class RunError(PeftVLMError):
    """A run folder is missing, unfinished, or would be overwritten."""


class ExportError(PeftVLMError):
    """Exporting, merging or pushing a trained run failed."""


class MetricsError(PeftVLMError):
    """Predictions or references cannot be scored."""


def format_error(err: PeftVLMError) -> str:
    """Render an error for the terminal: `error: <message>` then an optional hint line."""
    text = f"error: {err.message}"
    if err.hint:
        text += f"\nhint: {err.hint}"
    return text
