"""Errors a user can act on.

Everything raised as a `UserError` is printed by the CLI as one line, without a traceback:
the message must say what is wrong, where (file, column, key) and what was expected.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, spec, model or output location."""


class SpecError(UserError):
    """The job spec is malformed or refers to something that does not fit."""


class InputError(UserError):
    """The input data is missing, unreadable or does not fit the model."""


class OutputError(UserError):
    """The output location is unusable: locked, or holding another job's results."""


class BackendError(UserError):
    """The requested backend cannot run here."""


class BadRowsError(UserError):
    """More rows could not be converted than `max_bad_rows` allows."""


class JobFailedError(Exception):
    """Shards kept failing after their retries; the committed ones are kept."""


class CudaError(RuntimeError):
    """A CUDA runtime call failed; the message names the call. The actor is replaced."""
