"""The errors td-ray raises on bad input or output: the CLI prints these as one clear message."""
import errno

STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
"""OS errors of the storage itself (full, read-only, not permitted): reported with their fix, not as a traceback."""


class TdRayError(ValueError):
    """Bad input, config or model: the message names the item and the fix."""


class ModelError(TdRayError):
    """A model that cannot be found or used: the message names it and says how to fix it."""


class ExactlyOnceError(TdRayError):
    """A stage's output does not hold each input key exactly once; nothing was committed."""


class StaleIndexError(TdRayError):
    """The saved index does not match the student searching it, or its own files: re-run the index stage."""


class WorkspaceBusyError(TdRayError):
    """Another run holds the stage's lease on this workspace: the message names it and how to clear a stale one."""


class DriverGoneError(TdRayError):
    """The run an actor works for is gone: the actor stops without committing."""


class StorageError(TdRayError):
    """The workspace cannot be written or read (disk full, read-only, gone): the message names the file and the fix."""


class CorruptTableError(TdRayError):
    """A workspace table that cannot be read (truncated, corrupt): the message names it and how to rebuild it."""


def root_cause(error: BaseException) -> BaseException:
    """The error a user should read, out of the chains Ray wraps it in: a task's or actor's error (`cause`), Ray
    Data's UserCodeException (raised from it), Ray Train's worker failures. The first td-ray error found wins; else
    an OS error (a full disk) or a GPU out of memory; else `error` itself.

    >>> try:
    ...     try:
    ...         raise StorageError("disk full")
    ...     except StorageError as inner:
    ...         raise RuntimeError("UDF failed to process a data block") from inner
    ... except RuntimeError as outer:
    ...     str(root_cause(outer))
    'disk full'
    """
    seen: set[int] = set()
    pending, found = [error], None
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)
        if isinstance(current, TdRayError) and not isinstance(cause, BaseException):
            return current
        if found is None and (isinstance(current, OSError) and current.errno is not None
                              or is_out_of_memory(current)):
            found = current
        failures = getattr(current, "worker_failures", None)
        pending += [cause if isinstance(cause, BaseException) else None, current.__cause__, current.__context__,
                    *(failures.values() if isinstance(failures, dict) else ())]
    return found or error


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is torch's GPU out-of-memory error (told by name: this module does not import torch).

    >>> is_out_of_memory(type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory"))
    True
    """
    return type(error).__name__ == "OutOfMemoryError"
