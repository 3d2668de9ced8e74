"""The exceptions the SDK raises to the training code.

The SDK reports server-side trouble (overload, outages, rejected batches) through logging and
`Run.statistics()`, never by raising into the training loop. It raises only for mistakes the
caller can fix at the call site:

    SdkError
    ├── SettingsError     a bad setting, as argument or environment variable (named)
    ├── InvalidArgument   a bad argument to init()/finish() (project name, status, ...)
    ├── RunRejected       the server refused to create the run (bad key, bad project name, ...)
    ├── RunClosed         log()/finish() on a run that is already finished
    └── SpoolLocked       a spool directory is owned by a live process

Must not import anything beyond the standard library.
"""

from __future__ import annotations


class SdkError(Exception):
    """Base of the SDK's exceptions."""


class SettingsError(SdkError, ValueError):
    """A bad setting; the message starts with the argument or variable name."""


class InvalidArgument(SdkError, ValueError):
    """An argument the server would refuse; caught before anything is sent."""


class RunRejected(SdkError):
    """The server refused to create the run; retrying the same request cannot help."""

    def __init__(self, status: str, code: str, message: str) -> None:
        super().__init__(f"the server refused the run ({status} {code}): {message}")
        self.status = status
        self.code = code
        self.message = message


class RunClosed(SdkError, RuntimeError):
    """The run was finished; nothing more can be logged to it."""


class SpoolLocked(SdkError):
    """Another live process owns this spool directory (it holds the directory's lock)."""
