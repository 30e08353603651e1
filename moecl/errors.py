"""Errors a user can act on. The CLI prints their message (no traceback) and exits non-zero."""


class MoeclError(Exception):
    """Base class: the message says what is wrong and where (file, line, field, key)."""


class BankError(MoeclError):
    """An expert bank is missing, malformed, or was built on another base model."""


class UnknownTaskError(MoeclError):
    """A task id that the bank (or the data root) does not know."""
