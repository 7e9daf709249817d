"""Exception types. Every user-facing error says what is wrong and what to do."""


class SupereditError(Exception):
    """Base class for errors that the CLI prints without a traceback."""


class UnsupportedFamilyError(SupereditError):
    pass


class ModelNotFoundError(SupereditError):
    pass


class SubjectNotFoundError(SupereditError):
    pass


class TemplateError(SupereditError):
    pass


class RequestFormatError(SupereditError):
    pass


class StatsError(SupereditError):
    pass


class LedgerError(SupereditError):
    pass


class UsageError(SupereditError, ValueError):
    """A command-line option or argument has a value that cannot be used (also a ValueError for library
    callers); the message names the option and what is accepted."""


class FileFormatError(SupereditError, ValueError):
    """A file superedit reads back (JSON, JSONL) is not in the expected form; the message names the file."""


class LayerRangeError(SupereditError, IndexError):
    """A layer index outside the model (also an IndexError for library callers)."""
