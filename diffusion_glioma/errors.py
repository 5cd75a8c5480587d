"""The package's exceptions. The CLI prints these as one line; anything else is a bug."""


class DiffusionGliomaError(Exception):
    """Base class for errors a user can fix (bad input, bad settings)."""


class DataError(DiffusionGliomaError):
    """A file or folder that cannot be used; the message starts with its path."""


class ConfigError(DiffusionGliomaError):
    """A configuration file or option that is invalid."""
