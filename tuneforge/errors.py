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
