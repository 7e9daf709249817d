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
