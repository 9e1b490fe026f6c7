"""Errors a user can act on. The CLI prints their message on one line and exits non-zero."""


class UniversalSegError(Exception):
    """Base class of every error we show to a user instead of a traceback."""


class InputError(UniversalSegError):
    """The input image or an argument is missing, unreadable or implausible."""


class ModelFileError(UniversalSegError):
    """A model file is missing, corrupted, tampered with or of an unknown format."""


class UnknownClassError(UniversalSegError):
    """A class name matches nothing in the registry or the model."""


class ClassNotInModelError(UnknownClassError):
    """A known class (in the registry or another installed model) that the chosen model cannot segment."""


class UniversalSegWarning(UserWarning):
    """Base class of the warnings we show to a user; the CLI prints them as one `warning:` line."""
