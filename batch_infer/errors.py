"""Errors a user can act on, and the exit code each one gives.

Everything raised as a `UserError` is printed by the CLI as one line, without a traceback:
the message must say what is wrong, where (file, column, key) and what was expected.

Exit codes (the CLI's contract with schedulers and scripts):
    0   success
    1   an unexpected error (a bug: the traceback is printed)
    2   a user error: spec, input, model, output, backend; retrying will not help
    3   more bad rows than `max_bad_rows` (good shards are kept)
    4   shards failed after their retries (committed shards are kept; rerun to resume)
    5   the cluster or the network: unreachable, refused, or a server error; retry later
    130 interrupted (SIGINT or SIGTERM); committed shards are kept; rerun to resume
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_BAD_ROWS = 3
EXIT_FAILED = 4
EXIT_CLUSTER = 5
EXIT_INTERRUPTED = 130


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (some libraries' span several), for a message
    that must stay one line: a CLI error, a bad row's reason."""
    return " ".join(str(exc).split())


class UserError(Exception):
    """A problem with the user's input, spec, model or output location."""

    exit_code = EXIT_USER_ERROR


class SpecError(UserError):
    """The job spec is malformed or refers to something that does not fit."""


class InputError(UserError):
    """The input data is missing, unreadable or does not fit the model."""


class OutputError(UserError):
    """The output location is unusable: locked, or holding another job's results."""


class OutputFailedError(OutputError):
    """Writing to the output failed in a way no retry fixes (no space, read-only, no
    permission): the run stops at once; what was committed stays, and a rerun resumes."""


class SettingError(UserError):
    """A `BATCH_INFER_*` environment variable holds what its knob cannot take."""


class BackendError(UserError):
    """The requested backend cannot run here."""


class HookError(UserError):
    """A user's preprocess or postprocess hook raised, or returned what does not fit: its
    shard fails (nothing of it is committed); the message names the hook, shard and row."""


class BadRowsError(UserError):
    """More rows could not be converted than `max_bad_rows` allows."""

    exit_code = EXIT_BAD_ROWS


class JobFailedError(UserError):
    """Shards kept failing after their retries; the committed ones are kept."""

    exit_code = EXIT_FAILED


class ClusterError(UserError):
    """The Ray cluster cannot be reached, refused a request, or failed on its side: the
    request may succeed later, so schedulers can tell it from a user error."""

    exit_code = EXIT_CLUSTER


class CudaError(RuntimeError):
    """A CUDA runtime call failed; the message names the call. The actor is replaced."""
