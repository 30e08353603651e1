"""Errors a user can act on. The CLI prints their message (no traceback) and exits non-zero."""


class MoeclError(Exception):
    """Base class: the message says what is wrong and where (file, line, field, key)."""


class BankError(MoeclError):
    """An expert bank is missing, malformed, or was built on another base model."""


class IntegrityError(BankError):
    """A bank's bytes are not the ones it was written with: a file whose sha256 differs from the one its
    manifest records (a flipped byte, a truncated or missing file), or a manifest that fails its own checksum.
    The message names every such file, with the expected and the found hash."""


class UnknownTaskError(MoeclError):
    """A task id that the bank (or the data root) does not know."""


class WriteError(MoeclError, OSError):
    """A file could not be written (a full disk, a read-only file system, permissions). Nothing was
    half-written: the target is as it was. `.errno` is the cause's (errno.ENOSPC for a full disk).

    Built like an OSError, `WriteError(errno, message)`, so that it pickles; `moecl.io.write_error` makes one."""

    def __str__(self) -> str:
        return str(self.strerror)
