"""The bench's one error: a step it cannot go on without (a backend that does not start, a run
the server refuses to create) failed. `python -m bench` prints its one-line message and exits 1;
a failed measurement is not an error, it is a line in the report.

Must not import anything beyond the standard library.
"""

from __future__ import annotations


class BenchError(Exception):
    """A set-up or tear-down step failed; the message says which, in one line."""
