"""The package's exceptions. The CLI prints these as one line; anything else is a bug."""


class DiffusionGliomaError(Exception):
    """Base class for errors a user can fix (bad input, bad settings)."""


class DataError(DiffusionGliomaError):
    """A file or folder that cannot be used; the message starts with its path."""


class ConfigError(DiffusionGliomaError):
    """A configuration file or option that is invalid."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """What a library's exception says, as one short line for our own message (its type when silent)."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
