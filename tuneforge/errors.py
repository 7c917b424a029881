"""User-facing errors: one line that names the file, the line and the field, and says what to change."""


class TuneforgeError(Exception):
    """Base of every error the CLI prints as one line (exit code 2) instead of a traceback."""


class ConfigError(TuneforgeError):
    """A config file or a command-line override is invalid."""


class DataError(TuneforgeError):
    """A data file is missing, unreadable or holds a record that does not fit its format."""


class ModelError(TuneforgeError):
    """A model cannot be found, loaded, or combined with the requested strategies."""


class TrainingError(TuneforgeError):
    """Training cannot go on (for example a NaN loss)."""


def shown(value: object, limit: int = 60) -> str:
    """A user-supplied value as a short, single-line quotation for an error message.

    Keys, roles or values taken from a user's file may hold newlines or megabytes of text; quoting them
    through `repr` and cutting them keeps every error on one readable line.
    """
    text = repr(value)
    if len(text) <= limit:
        return text
    return text[: limit - 3] + "..."
