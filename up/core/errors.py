"""The one exception type a stage raises for a user-fixable problem.

The CLI prints its message (no traceback) and exits with status 1: a missing
input file, a corrupt dataset, a NaN loss. Programming errors keep their
tracebacks.
"""


class StageError(RuntimeError):
    """A problem with the inputs or the run that the user can fix."""
